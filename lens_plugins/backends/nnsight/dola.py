"""DoLa decoding (Chuang et al. 2023) inside one nnsight ``model.generate(...)`` request: the in-trace
``dola`` (``core/trace/dola.py``, shipped by source), its labelling ``dola_result`` and the one-call
``run_dola``."""

from collections.abc import Sequence
from typing import Optional, Union

import nnsight
import torch

from lens_plugins.backends._common import check_max_new_tokens, check_token_ids, eval_mode, one_at_a_time, unwrap
from lens_plugins.backends.nnsight._run import generation_ends, one_prompt, remote_error, stopped_early, trace_kwargs
from lens_plugins.core.trace.dola import dola
from lens_plugins.methods import dola as dola_module
from lens_plugins.methods.dola import DolaOutput
from lens_plugins.typecheck import typechecked


@one_at_a_time
@typechecked
def run_dola(
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
    prepend_bos: Optional[bool] = None,
) -> DolaOutput:
    """DoLa decoding (Chuang et al. 2023) of ``text`` in one ``model.generate`` request; see
    ``lens_plugins.core.dola`` for the definition and ``core/trace/dola.py`` for the in-trace form.
    ``tied_embeddings`` (for ``layers="low"``) defaults to the model config's ``tie_word_embeddings``; text is
    tokenized with ``prepend_bos`` as in ``run_logit_lens`` (token ids run as given)."""
    check_token_ids(model, text)
    check_max_new_tokens(max_new_tokens)
    text = one_prompt(model, text, max_new_tokens, prepend_bos)
    ended: dict = {}
    try:
        with generation_ends(ended), eval_mode(unwrap(model)), model.generate(
            text, max_new_tokens=max_new_tokens, do_sample=False, **trace_kwargs(remote, backend, model)
        ) as tracer:
            saved = nnsight.save({})  # filled step by step: a generation that stops early never returns
            dola(model, tracer, max_new_tokens, layers=layers, alpha=alpha,
                            repetition_penalty=repetition_penalty, premature_norm=premature_norm, paths=paths,
                            into=saved, tied_embeddings=tied_embeddings)
    except Exception as error:  # noqa: BLE001 - re-raised with what happened, unless it is ours
        raise remote_error(error, remote, backend) from error
    out = dola_result(saved, model)
    stopped_early("DoLa", out.generated_ids, max_new_tokens, model.tokenizer)
    return out


@typechecked
def dola_result(saved: dict, model) -> DolaOutput:
    """The ``DolaOutput`` of what ``dola(model, tracer, steps)`` saved inside the generation."""
    return dola_module.output(saved, getattr(model, "tokenizer", model))

__all__ = ["run_dola", "dola_result"]
