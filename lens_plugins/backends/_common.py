"""The one-call guards both backends share, so that every ``run_*`` verb refuses the same input with the
same message: context length, prompt text, padding of a batch, eval mode, the model under a wrapper."""

import contextlib
import warnings
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from lens_plugins.core.errors import LensTypeError, LensValueError


def unwrap(model):
    """The module under an nnsight ``LanguageModel`` (its ``_module``), or ``model`` itself."""
    return getattr(model, "_module", model)


def context_length(model) -> Optional[int]:
    """The longest prompt ``model`` was trained for: ``cfg.n_ctx`` of a TransformerLens model, else the
    Hugging Face config's position limit; ``None`` where there is none (ALiBi models such as BLOOM)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "n_ctx", None):
        return int(cfg.n_ctx)
    config = getattr(unwrap(model), "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(n_tokens: int, limit: Optional[int]) -> None:
    """Refuse a prompt longer than the model's context window (``limit``; ``None``: no known limit), before
    the model silently truncates it or runs positions it was never trained on."""
    if limit is not None and n_tokens > limit:
        raise LensValueError(
            f"the prompt is {n_tokens} tokens, longer than the model's context of {limit} tokens: "
            f"shorten it (or split it) to at most {limit} tokens"
        )


def pad_batch(sequences: Sequence[Tensor], pad_id: int, side: str) -> tuple[Tensor, Tensor]:
    """``(token_ids, attention_mask)``, both ``[batch, longest]``, of ragged 1-d token sequences padded on
    ``side`` ("left" or "right") with ``pad_id``; the mask is 1 on real tokens."""
    if side not in ("left", "right"):
        raise LensValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    longest = max(len(s) for s in sequences)
    token_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(longest - len(sequence), longest) if side == "left" else slice(0, len(sequence))
        token_ids[row, span] = sequence
        mask[row, span] = 1
    return token_ids, mask


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Run ``module`` in eval mode for the duration (a model in training mode runs dropout, so its lens
    would not be its prediction), warning that it did so, and put training mode back afterwards."""
    if not module.training:
        yield
        return
    warnings.warn(
        "the model is in training mode (dropout on): the lens ran it in eval mode for this call and then "
        "put it back in training mode. Call model.eval() first to silence this warning.",
        RuntimeWarning, stacklevel=3,
    )
    module.eval()
    try:
        yield
    finally:
        module.train()


def check_prompts(prompt: Union[str, Sequence[str]]) -> list[str]:
    """The prompts of a one-call lens as a list, refusing an empty batch and empty or whitespace-only text
    (which tokenises to nothing, or to a lone BOS: no prediction to look at)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise LensValueError("the prompt is empty (an empty list): give the model some text to predict from")
    for index, text in enumerate(prompts):
        if not isinstance(text, str):
            raise LensTypeError(f"prompt {index} is a {type(text).__name__}, not a string")
        if not text.strip():
            where = "the prompt" if isinstance(prompt, str) else f"prompt {index} of the batch"
            raise LensValueError(f"{where} is empty ({text!r}): give the model some text to predict from")
    return prompts


def check_max_new_tokens(max_new_tokens: int) -> None:
    """Refuse a generation of no tokens before any forward pass."""
    if max_new_tokens < 1:
        raise LensValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")


__all__ = ["unwrap", "context_length", "check_context", "pad_batch", "eval_mode", "check_prompts",
           "check_max_new_tokens"]
