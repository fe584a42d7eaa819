"""nnsight, local side of the generation verbs: the lens over generated text and DoLa decoding.

Both run inside one ``model.generate(...)`` request, so a remote (NDIF) generation is one round trip; the
in-trace halves are ``lens_plugins.core.generation`` and ``lens_plugins.core.dola_trace`` (shipped by source).
Re-exported by ``lens_plugins.adapters.nnsight`` (``lp.nnsight.generation_lens`` etc.).
"""

import inspect
from collections.abc import Sequence
from typing import Optional, Union

import nnsight
import torch

from lens_plugins import dola as dola_module
from lens_plugins import generation
from lens_plugins.core import dola_trace, generation as core_generation
from lens_plugins.core.reductions import DEFAULT_LENS as DEFAULT_LENS_REDUCTIONS
from lens_plugins.dola import DolaOutput
from lens_plugins.generation import GeneratedLens
from lens_plugins.logit_lens import DEFAULT_TOP_K, check_context, check_prompts, eval_mode
from lens_plugins.models import context_length
from lens_plugins.typecheck import typechecked


@typechecked
def generation_result(lens: dict, model) -> GeneratedLens:
    """The ``GeneratedLens`` of what ``generation_lens(model, tracer, steps)`` saved inside the generation."""
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
    top_k: int = DEFAULT_TOP_K,
    targets: Sequence[Union[str, int]] = (),
    token_sets: Optional[dict] = None,
    reductions: Sequence[str] = DEFAULT_LENS_REDUCTIONS,
    layers: Optional[Sequence[Union[int, str]]] = None,
    resid_mid: bool = False,
    sublayers: Union[bool, str] = False,
    lens=None,
    paths: Optional[dict] = None,
    **generate_kwargs,
) -> GeneratedLens:
    """Generate greedily from ``text`` (``generate_kwargs`` go to ``model.generate``, e.g. ``do_sample=True``)
    and lens every step, in one request: the one-call form. The lens parameters are ``run_logit_lens``'s."""
    from lens_plugins.adapters.nnsight import _remote_error, _shippable

    _one_prompt(model, text)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    generation.refuse_arguments(generate_kwargs, inspect.signature(run_generation_lens).parameters)
    generate_kwargs.setdefault("do_sample", False)
    rows = dict(layers=layers, resid_mid=resid_mid, sublayers=sublayers, paths=paths)
    lens = _shippable(model, lens, remote, backend, **rows)
    try:
        with eval_mode(getattr(model, "_module", model)), model.generate(
            text, max_new_tokens=max_new_tokens, **generate_kwargs, **_generate_kwargs(remote, backend)
        ) as tracer:
            saved = nnsight.save({})  # filled step by step: a generation that stops early never returns
            core_generation.generation_lens(model, tracer, max_new_tokens, top_k=top_k, targets=list(targets),
                                            token_sets=token_sets, reductions=tuple(reductions), lens=lens,
                                            into=saved, **rows)
    except Exception as error:  # noqa: BLE001 - re-raised with what happened, unless it is ours
        raise _remote_error(error, remote, backend) from error
    return generation_result(saved, model)


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
    tied_embeddings: Optional[bool] = None,
    remote: Union[bool, str] = False,
    backend=None,
    paths: Optional[dict] = None,
) -> DolaOutput:
    """DoLa decoding (Chuang et al. 2023) of ``text`` in one ``model.generate`` request; see
    ``lens_plugins.core.dola`` for the definition and ``core.dola_trace.dola`` for the in-trace form.
    ``tied_embeddings`` (for ``layers="low"``) defaults to the model config's ``tie_word_embeddings``."""
    from lens_plugins.adapters.nnsight import _remote_error

    _one_prompt(model, text)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    try:
        with eval_mode(getattr(model, "_module", model)), model.generate(
            text, max_new_tokens=max_new_tokens, do_sample=False, **_generate_kwargs(remote, backend)
        ) as tracer:
            saved = nnsight.save({})  # filled step by step: a generation that stops early never returns
            dola_trace.dola(model, tracer, max_new_tokens, layers=layers, alpha=alpha,
                            repetition_penalty=repetition_penalty, premature_norm=premature_norm, paths=paths,
                            into=saved, tied_embeddings=tied_embeddings)
    except Exception as error:  # noqa: BLE001 - re-raised with what happened, unless it is ours
        raise _remote_error(error, remote, backend) from error
    return dola_output(saved, model)


@typechecked
def dola_output(saved: dict, model) -> DolaOutput:
    """The ``DolaOutput`` of what ``dola(model, tracer, steps)`` saved inside the generation."""
    return dola_module.output(saved, getattr(model, "tokenizer", model))


__all__ = ["generation_result", "run_generation_lens", "dola_generate", "dola_output"]
