"""The lens over generated text inside one nnsight ``model.generate(...)`` request (a remote generation is
one round trip): the in-trace ``generation_lens`` (``core/trace/generation.py``, shipped by source), its
labelling ``generation_result`` and the one-call ``run_generation_lens``."""

import inspect
from collections.abc import Sequence
from typing import Optional, Union

import nnsight
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from lens_plugins.backends._common import check_max_new_tokens, check_token_ids, eval_mode, one_at_a_time, unwrap
from lens_plugins.backends.nnsight._run import (
    generation_ends,
    one_prompt,
    remote_error,
    shippable,
    stopped_early,
    trace_kwargs,
)
from lens_plugins.core.defaults import TOP_K
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.reductions import DEFAULT_LENS as DEFAULT_LENS_REDUCTIONS
from lens_plugins.core.trace.generation import generation_lens
from lens_plugins.core.request import check_reductions
from lens_plugins.methods import generation
from lens_plugins.methods.generation import GeneratedLens
from lens_plugins.progress import bar as progress_bar
from lens_plugins.typecheck import typechecked


class _Steps(StoppingCriteria):
    """Advances a progress bar at every generation step and never stops the generation."""

    def __init__(self, shown):
        self.shown = shown

    def __call__(self, input_ids, scores, **kwargs):
        self.shown.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@typechecked
def generation_result(lens: dict, model) -> GeneratedLens:
    """The ``GeneratedLens`` of what ``generation_lens(model, tracer, steps)`` saved inside the generation."""
    return generation.from_saved_steps(lens, getattr(model, "tokenizer", model))


@one_at_a_time
@typechecked
def run_generation_lens(
    model,
    text: Union[str, torch.Tensor],
    *,
    max_new_tokens: int = 10,
    remote: Union[bool, str] = False,
    backend=None,
    top_k: int = TOP_K,
    targets: Sequence[Union[str, int]] = (),
    token_sets: Optional[dict] = None,
    reductions: Sequence[str] = DEFAULT_LENS_REDUCTIONS,
    layers: Optional[Sequence[Union[int, str]]] = None,
    resid_mid: bool = False,
    sublayers: Union[bool, str] = False,
    lens=None,
    paths: Optional[dict] = None,
    prepend_bos: Optional[bool] = None,
    progress: bool = False,
    **generate_kwargs,
) -> GeneratedLens:
    """Generate greedily from ``text`` (``generate_kwargs`` go to ``model.generate``, e.g. ``do_sample=True``)
    and lens every step, in one request: the one-call form. The lens parameters and ``prepend_bos`` (text
    only; token ids run as given) are ``run_logit_lens``'s. ``progress``: a bar over generated tokens
    (``lens_plugins.progress``), local models only: a remote generation is one request run on the server."""
    check_token_ids(model, text)
    check_max_new_tokens(max_new_tokens)
    if progress and (remote or backend is not None):
        raise LensValueError("progress=True counts generation steps on this machine, but a remote generation runs "
                             "on the server in one request: drop progress (the request's status is logged as it runs)")
    text = one_prompt(model, text, max_new_tokens, prepend_bos)
    generation.refuse_arguments(generate_kwargs, inspect.signature(run_generation_lens).parameters)
    generate_kwargs.setdefault("do_sample", False)
    rows = dict(layers=layers, resid_mid=resid_mid, sublayers=sublayers, paths=paths)
    lens = shippable(model, lens, remote, backend, **rows)
    ended: dict = {}
    shown = progress_bar(progress, max_new_tokens, "generation lens", "token")
    if progress:  # a stopping criterion that never stops: HF generate calls it once per generated token
        generate_kwargs["stopping_criteria"] = StoppingCriteriaList(
            list(generate_kwargs.get("stopping_criteria") or []) + [_Steps(shown)])
    try:
        with shown, generation_ends(ended), eval_mode(unwrap(model)), model.generate(
            text, max_new_tokens=max_new_tokens, **generate_kwargs, **trace_kwargs(remote, backend, model)
        ) as tracer:
            saved = nnsight.save({})  # filled step by step: a generation that stops early never returns
            generation_lens(model, tracer, max_new_tokens, top_k=top_k, targets=list(targets),
                                            token_sets=token_sets, reductions=check_reductions(reductions), lens=lens,
                                            into=saved, **rows)
    except Exception as error:  # noqa: BLE001 - re-raised with what happened, unless it is ours
        raise remote_error(error, remote, backend) from error
    result = generation_result(saved, model)
    stopped_early("the generation lens", result.generated_ids(), max_new_tokens, model.tokenizer)
    return result

__all__ = ["generation_result", "run_generation_lens"]
