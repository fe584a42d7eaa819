"""nnsight, local side of the generation verbs: the lens over generated text and DoLa decoding.

Both run inside one ``model.generate(...)`` request, so a remote (NDIF) generation is one round trip; the
in-trace halves are ``lens_plugins.remote_generation`` and ``lens_plugins.remote_dola`` (shipped by source).
Re-exported by ``lens_plugins.adapters.nnsight`` (``lp.nnsight.generation_lens`` etc.).
"""

from collections.abc import Sequence
from typing import Optional, Union

import nnsight
import torch

from lens_plugins import dola as dola_module
from lens_plugins import generation, prompt, remote_dola, remote_generation
from lens_plugins.dola import DolaOutput
from lens_plugins.generation import GeneratedLens
from lens_plugins.logit_lens import check_context, check_prompts, eval_mode
from lens_plugins.models import context_length
from lens_plugins.typecheck import typechecked


@typechecked
def generation_result(lens: dict, model) -> GeneratedLens:
    """The ``GeneratedLens`` of what ``generation_lens(model, tracer, steps)`` saved inside the generation."""
    if not isinstance(lens, dict) or lens.get("format") != remote_generation.FORMAT:
        raise TypeError(f"expected what generation_lens(model, tracer, steps) returned inside model.generate(...), "
                        f"got {type(lens).__name__}")
    return generation.from_saved_steps(lens, getattr(model, "tokenizer", model))


def _generate_kwargs(remote, backend) -> dict:
    return {"remote": remote} if backend is None else {"backend": backend}


def _one_prompt(model, text: Union[str, torch.Tensor]) -> None:
    """One prompt, as text or as ``[1, seq]`` token ids, within the model's context."""
    if isinstance(text, torch.Tensor):
        if text.dim() != 2 or text.shape[0] != 1 or text.shape[1] == 0:
            raise ValueError(f"generation takes one prompt: token ids of shape [1, seq], got {tuple(text.shape)}")
        n_tokens = text.shape[1]
    else:
        if not isinstance(text, str):
            raise TypeError("generation takes one prompt (a string or [1, seq] token ids); run a batch prompt by prompt")
        check_prompts(text)
        n_tokens = len(model.tokenizer(text)["input_ids"])
    check_context(n_tokens, context_length(model))


@typechecked
def run_generation_lens(
    model,
    text: Union[str, torch.Tensor],
    *,
    max_new_tokens: int = 10,
    remote: Union[bool, str] = False,
    backend=None,
    top_k: int = 10,
    targets: Sequence[Union[str, int]] = (),
    reductions: Sequence[str] = prompt.DEFAULT_LENS_REDUCTIONS,
    **generate_kwargs,
) -> GeneratedLens:
    """Generate greedily from ``text`` (``generate_kwargs`` go to ``model.generate``, e.g. ``do_sample=True``)
    and lens every step, in one request: the one-call form."""
    from lens_plugins.adapters.nnsight import _remote_error

    _one_prompt(model, text)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    generate_kwargs.setdefault("do_sample", False)
    try:
        with eval_mode(getattr(model, "_module", model)), model.generate(
            text, max_new_tokens=max_new_tokens, **generate_kwargs, **_generate_kwargs(remote, backend)
        ) as tracer:
            lens = nnsight.save({})  # filled step by step: a generation that stops early never returns
            remote_generation.generation_lens(model, tracer, max_new_tokens, top_k=top_k, targets=list(targets),
                                              reductions=tuple(reductions), into=lens)
    except Exception as error:  # noqa: BLE001 - re-raised with what happened, unless it is ours
        raise _remote_error(error, remote, backend) from error
    return generation_result(lens, model)


@typechecked
def dola_generate(
    model,
    text: Union[str, torch.Tensor],
    *,
    max_new_tokens: int = 10,
    layers: Union[str, Sequence[int]] = "high",
    alpha: float = 0.1,
    repetition_penalty: Optional[float] = None,
    premature_norm: bool = True,
    remote: Union[bool, str] = False,
    backend=None,
) -> DolaOutput:
    """DoLa decoding (Chuang et al. 2023) of ``text`` in one ``model.generate`` request; see
    ``lens_plugins.core.dola`` for the definition and ``remote_dola.dola`` for the in-trace form."""
    from lens_plugins.adapters.nnsight import _remote_error

    _one_prompt(model, text)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    try:
        with eval_mode(getattr(model, "_module", model)), model.generate(
            text, max_new_tokens=max_new_tokens, do_sample=False, **_generate_kwargs(remote, backend)
        ) as tracer:
            saved = nnsight.save({})  # filled step by step: a generation that stops early never returns
            remote_dola.dola(model, tracer, max_new_tokens, layers=layers, alpha=alpha,
                             repetition_penalty=repetition_penalty, premature_norm=premature_norm, into=saved)
    except Exception as error:  # noqa: BLE001 - re-raised with what happened, unless it is ours
        raise _remote_error(error, remote, backend) from error
    return dola_output(saved, model)




@typechecked
def dola_output(saved: dict, model) -> DolaOutput:
    """The ``DolaOutput`` of what ``dola(model, tracer, steps)`` saved inside the generation."""
    return dola_module.output(saved, getattr(model, "tokenizer", model))


__all__ = ["generation_result", "run_generation_lens", "dola_generate", "dola_output"]
