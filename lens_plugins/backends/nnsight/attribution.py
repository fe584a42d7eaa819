"""Direct logit attribution and the lens's logit difference inside nnsight traces: the in-trace verbs
(``attribution``, ``logit_diff``: ``core/trace/``), their labelling (``attribution_result``,
``logit_diff_result``) and their one-call forms, with ``run_logit_lens``'s guards and remote errors."""

from collections.abc import Sequence
from typing import Optional, Union

from lens_plugins.backends._common import Prompt, one_at_a_time
from lens_plugins.backends.nnsight._run import RemoteJob, run, shippable
from lens_plugins.backends.nnsight.reader import Sublayers
from lens_plugins.core.defaults import TOP_NEURONS
from lens_plugins.core.trace.attribution import attribution
from lens_plugins.core.trace.lens import logit_diff
from lens_plugins.methods.attribution import (
    Attribution,
    LogitDiff,
    TokenSet,
    check_view,
    logit_diff_from_saved,
    result_from_saved,
)
from lens_plugins.typecheck import typechecked


@typechecked
def logit_diff_result(saved: dict, model) -> LogitDiff:
    """The ``LogitDiff`` of what ``logit_diff(model, ...)`` saved inside a trace."""
    return logit_diff_from_saved(saved, getattr(model, "tokenizer", model))


@typechecked
def attribution_result(saved: dict, model, by: str = "component") -> Attribution:
    """The ``Attribution`` of what ``attribution(model, ...)`` saved inside a trace (``model`` supplies the
    tokenizer for the target names); ``by`` is ``"component"``, ``"layer"``, ``"head"`` or (when the trace
    called ``attribution(model, ..., neurons=True)``) ``"neuron"``."""
    return result_from_saved(saved, getattr(model, "tokenizer", model), by=by)


@one_at_a_time
@typechecked
def run_logit_diff(
    model,
    prompt: Prompt,
    target: TokenSet,
    distractor: TokenSet,
    *,
    remote: Union[bool, str] = False,
    backend=None,
    resid_mid: bool = False,
    sublayers: Sublayers = False,
    layers: Optional[Sequence[Union[int, str]]] = None,
    positions: Optional[Union[int, Sequence[int]]] = None,
    lens=None,
    paths: Optional[dict] = None,
    padding_side: Optional[str] = None,
    prepend_bos: Optional[bool] = None,
    blocking: bool = True,
) -> Union[LogitDiff, RemoteJob]:
    """Trace ``prompt`` and return the lens's ``target`` minus ``distractor`` at every row and position:
    the one-call form of ``logit_diff``, with ``run_logit_lens``'s guards and ``prepend_bos``."""
    rows = dict(layers=layers, resid_mid=resid_mid, sublayers=sublayers, paths=paths)
    lens = shippable(model, lens, remote, backend, **rows)
    return run(model, prompt, remote, backend,
               lambda: logit_diff(model, target, distractor, positions=positions, lens=lens, **rows),
               lambda saved: logit_diff_result(saved, model), blocking, padding_side, prepend_bos)


@one_at_a_time
@typechecked
def run_attribution(
    model,
    prompt: Prompt,
    target: TokenSet,
    distractor: Optional[TokenSet] = None,
    *,
    by: str = "component",
    position: int = -1,
    remote: Union[bool, str] = False,
    backend=None,
    paths: Optional[dict] = None,
    padding_side: Optional[str] = None,
    prepend_bos: Optional[bool] = None,
    top_neurons: int = TOP_NEURONS,
    effects: int = 0,
    blocking: bool = True,
) -> Union[Attribution, RemoteJob]:
    """Trace ``prompt`` and return the direct logit attribution of ``target`` (minus ``distractor``) at
    ``position``: the one-call form, with ``run_logit_lens``'s guards (context length, padding with its
    mask, eval mode), its ``prepend_bos`` and its remote errors.

    Args:
        model: an nnsight model.
        prompt: a text or a list of texts, or model inputs (a processor's output: ``input_ids``, ``pixel_values`` ...).
        target: the token whose logit is explained (string, id, or a list of them).
        distractor: the token subtracted; ``None`` explains the target's logit alone.
        by: ``"component"``, ``"layer"`` or ``"head"``.
        position: the position explained.
        remote: ``False``, ``True`` (NDIF) or ``"local"``.
        backend: an nnsight backend passed to the trace.
        paths: module paths for an unknown family.
        padding_side: ``"left"`` or ``"right"`` for a batch.
        prepend_bos: as ``run_logit_lens``.

    Returns:
        The same ``Attribution`` as ``lp.transformer_lens.run_attribution``.

    Raises:
        RemoteLensError: a remote trace failed.
        LensValueError: a target that is not one token, a padding position.
    """
    check_view(by)
    return run(model, prompt, remote, backend,
               lambda: attribution(model, target, distractor, position=position, paths=paths,
                                   neurons=by == "neuron", top_neurons=top_neurons, effects=effects),
               lambda saved: attribution_result(saved, model, by=by), blocking, padding_side, prepend_bos)

__all__ = ["logit_diff_result", "attribution_result", "run_logit_diff", "run_attribution"]
