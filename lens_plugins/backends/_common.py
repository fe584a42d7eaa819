"""The one-call guards both backends share, so that every ``run_*`` verb refuses the same input with the
same message: context length, prompt text, the one tokenization rule (``prompt_ids``: BOS or not), token ids
in the vocabulary, padding of a batch, eval mode, the model under a wrapper, a model with weights to run, and one
call at a time on one model."""

import contextlib
import functools
import threading
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from lens_plugins.core.decoder_lens import one_example
from lens_plugins.core.errors import LensTypeError, LensValueError


# What a one-call verb runs: text, a batch of texts, or model inputs (a processor's output, with an image's
# ``pixel_values``: ``processor_inputs``).
Prompt = Union[str, list[str], Mapping]


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


def check_context(n_tokens: int, limit: Optional[int], max_new_tokens: int = 0, what: str = "the prompt") -> None:
    """Refuse a prompt longer than the model's context window (``limit``; ``None``: no known limit), or one
    whose generation of ``max_new_tokens`` would run past it, before any forward pass: the model would
    otherwise silently truncate it, run positions it was never trained on (rotary models), or fail deep in
    torch (learned positions, GPT-2). Prompt plus continuation must fit, as for Hugging Face's ``max_length``.
    ``what`` names the prompt in the message ("the target prompt" of a Patchscope)."""
    if limit is None or n_tokens + max_new_tokens <= limit:
        return
    if max_new_tokens == 0:
        raise LensValueError(
            f"{what} is {n_tokens} tokens, longer than the model's context of {limit} tokens: "
            f"shorten it (or split it) to at most {limit} tokens"
        )
    raise LensValueError(
        f"{what} is {n_tokens} tokens and max_new_tokens={max_new_tokens}: {n_tokens + max_new_tokens} tokens "
        f"in all, longer than the model's context of {limit} tokens: shorten {what} or lower max_new_tokens "
        f"so that the two add up to at most {limit}"
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


def example_ids(tokenizer, value: Union[str, Tensor], name: str, prepend_bos: Optional[bool]) -> Tensor:
    """The DecoderLens's one example ``[1, seq]``: text through ``prompt_ids`` (as every one-call form), then
    ``core.decoder_lens.one_example``'s checks; token ids as given."""
    if isinstance(value, str) and value.strip():
        value = torch.tensor([prompt_ids(tokenizer, value, prepend_bos)])
    return one_example(tokenizer, value, name)


def pad_prompts(tokenizer, sequences: Sequence[Sequence[int]], side: str) -> tuple[Tensor, Tensor]:
    """``pad_batch`` of ``prompt_ids`` lists with the tokenizer's pad token (its end-of-text token if it has
    none, as the one-call forms always padded)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_batch([torch.tensor(ids, dtype=torch.long) for ids in sequences], pad_id, side)


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


def vocab_size(model) -> Optional[int]:
    """The model's vocabulary size: ``cfg.d_vocab`` of a TransformerLens model, else the Hugging Face config's
    ``vocab_size``; ``None`` where neither says."""
    cfg = getattr(model, "cfg", None)
    value = getattr(cfg, "d_vocab", None) if cfg is not None else None
    if not isinstance(value, int):
        value = getattr(getattr(unwrap(model), "config", None), "vocab_size", None)
    return value if isinstance(value, int) and value > 0 else None


def check_token_ids(model, prompt, argument: str = "text") -> None:
    """Refuse a prompt given as token ids (``argument``, a tensor) holding an id outside the model's vocabulary,
    before any forward pass: the embedding lookup would fail deep in torch ("index out of range in self", or a
    device-side assert on a GPU). Text is left to the tokenizer."""
    if not isinstance(prompt, Tensor) or prompt.numel() == 0:
        return
    if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
        raise LensTypeError(f"{argument} as token ids must be an integer tensor, got dtype {prompt.dtype}: "
                            "pass model.tokenizer(text, return_tensors='pt').input_ids, or the text itself")
    limit = vocab_size(model)
    bad = (prompt < 0) | (prompt >= limit) if limit is not None else prompt < 0
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise LensValueError(
            f"{argument} holds token id {int(prompt[where])} at index {where}, outside the model's vocabulary "
            f"[0, {limit if limit is not None else 'vocab'}): tokenize with this model's own tokenizer "
            "(model.tokenizer), or pass the text itself")


def check_one_prompt_ids(model, text) -> None:
    """Refuse token ids that are not one prompt a generation can start from, naming ``text``: the shape
    ``[1, seq]`` with ``seq >= 1``, integer ids inside the vocabulary (``check_token_ids``)."""
    if text.dim() != 2 or text.shape[0] != 1:
        raise LensValueError(f"text as token ids must be one prompt of shape [1, seq], got {tuple(text.shape)}: "
                             "generation runs one prompt at a time")
    if text.shape[1] == 0:
        raise LensValueError("text is empty (token ids of shape (1, 0)): give the model at least one token")
    check_token_ids(model, text)


def check_model(model) -> None:
    """Refuse what a one-call verb cannot run, where it starts: something that is not a model (arguments in
    the wrong order put the prompt there), or a TransformerLens or Hugging Face model whose weights are on the
    ``meta`` device (built without loading them), which would fail deep in torch on the first matmul. An
    nnsight model is left alone: it loads meta weights itself (``remote_model``) or runs them remotely."""
    module = unwrap(model)
    if not isinstance(module, torch.nn.Module):
        raise LensTypeError(
            f"the first argument must be the model (a TransformerLens or nnsight model), got a "
            f"{type(model).__name__}: call verb(model, prompt, ...)")
    if module is model and any(p.is_meta for p in model.parameters()):
        raise LensValueError(
            "the model's weights are on the 'meta' device (built without loading them): there is nothing to run. "
            "Load the weights first (e.g. from_pretrained without device_map='meta', or model.to_empty(device=...) "
            "followed by load_state_dict)")


def prompt_ids(tokenizer, text: str, prepend_bos: Optional[bool]) -> list[int]:
    """The token ids every one-call form of both backends runs for ``text``: the one rule, so that the same
    prompt is the same input on TransformerLens and on nnsight.

    ``prepend_bos=None``: as ``tokenizer(text)`` does (the model's own Hugging Face tokenizer, as
    ``model.generate``, pipelines and every nnsight trace you write tokenize; in-trace forms cannot change your
    trace's tokenization, so this is the one default both backends can share). ``True``: exactly one BOS at the
    start, prepended unless the ids already start with it. ``False``: no BOS, one the tokenizer added removed
    (one the text itself spells, such as a chat template's, is kept)."""
    ids = list(tokenizer(text)["input_ids"])
    bos = tokenizer.bos_token_id
    if prepend_bos is None or (bos is None and not prepend_bos):
        return ids
    if bos is None:
        raise LensValueError(
            f"prepend_bos=True, but the tokenizer ({type(tokenizer).__name__}) has no bos_token: pass "
            "prepend_bos=None (its own tokenization) or prepend_bos=False"
        )
    if prepend_bos:
        return ids if ids[:1] == [bos] else [bos] + ids
    if ids[:1] != [bos]:
        return ids
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[1:] if ids[1:len(plain) + 1] == list(plain) else ids  # added by the tokenizer, not spelled


def processor_inputs(model, prompt) -> Optional[dict]:
    """A prompt given as model inputs (the mapping a Hugging Face processor returns: ``input_ids``, an
    ``attention_mask`` and, for a vision-language model, ``pixel_values`` and the like) as a plain dict, checked
    the way text is (ids in the vocabulary, the context length); ``None`` for a prompt given as text. This is how
    an image reaches every one-call verb: the processor's output is the prompt, run as it is (no BOS rule)."""
    if isinstance(prompt, (str, list, tuple)) or not hasattr(prompt, "keys"):
        return None
    inputs = {key: prompt[key] for key in prompt.keys()}
    ids = inputs.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] == 0:
        raise LensValueError(
            f"a prompt given as model inputs needs input_ids of shape [batch, seq] (a tensor), got "
            f"{type(ids).__name__ if not isinstance(ids, Tensor) else tuple(ids.shape)} (keys {sorted(inputs)}): "
            "pass what the model's processor returns, e.g. processor(text=..., images=..., return_tensors='pt')")
    check_token_ids(model, ids, "input_ids")
    check_context(ids.shape[1], context_length(model))
    if inputs.get("attention_mask") is None:
        inputs["attention_mask"] = torch.ones_like(ids)
    return inputs


def check_max_new_tokens(max_new_tokens: int) -> None:
    """Refuse a generation of no tokens before any forward pass."""
    if max_new_tokens < 1:
        raise LensValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")


_THREADS_NOTE = """

    Threads: calls on one model run one at a time (correct results, no speed-up); for parallelism use one
    model per thread, or processes."""

_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.RLock:
    """The one lock of ``model``'s underlying module (the module under an nnsight wrapper, so two wrappers of
    one model share it), made on first use under a global lock so that two threads never get two locks.
    Kept by weak reference: it goes when the model does."""
    module = unwrap(model)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


def one_at_a_time(run):
    """Hold ``model_lock`` of the first argument (the model) for the whole one-call ``run``: tokenizing,
    installing hooks, the forward passes and reading what they left. TransformerLens hooks are global to the
    model and nnsight's tracing state is per model, so two threads running one model at once would read each
    other's activations (or fail inside nnsight); with the lock, concurrent calls on one model serialise:
    correct results, no speed-up (use one model per thread, or processes, for parallelism). Re-entrant, so
    a verb that calls another does not deadlock."""

    @functools.wraps(run)
    def locked(model, *args, **kwargs):
        check_model(model)
        with model_lock(model):
            return run(model, *args, **kwargs)

    locked.__doc__ = (run.__doc__ or "").rstrip() + _THREADS_NOTE  # help() of every verb says it
    return locked


__all__ = ["Prompt", "unwrap", "context_length", "check_context", "model_lock", "one_at_a_time", "pad_batch", "pad_prompts",
           "eval_mode", "check_prompts", "prompt_ids", "example_ids", "vocab_size", "check_token_ids", "check_one_prompt_ids", "check_model", "processor_inputs",
           "check_max_new_tokens"]
