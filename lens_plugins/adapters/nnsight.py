"""The logit lens inside nnsight traces, local or on NDIF: the caller's side.

Usage (the same code for ``remote=False``, ``remote="local"`` and ``remote=True``)::

    import lens_plugins as lp

    model = lp.load_default_model(backend="nnsight")       # or lp.nnsight.wrap_model(hf_model, tokenizer)
    with model.trace("The capital of France is"):
        lens = lp.nnsight.logit_lens(model, top_k=10, targets=[" Paris"])
    result = lp.nnsight.result(lens, model)                 # a LensResult, as from TransformerLens

``logit_lens``, ``logit_diff`` and ``attribution`` run inside the trace, on whatever machine runs it
(``lens_plugins.core.trace``): they read the rows of the same row plan as TransformerLens (row -> a module's
input or output), run the same pipeline with the same request and checks, and save only the reductions.
``result``, ``logit_diff_result`` and ``attribution_result`` label them locally; ``run_*`` are the one-call
forms. With several prompts, call the lens in each ``tracer.invoke(prompt)`` (that prompt's rows), or once in
an empty ``tracer.invoke()`` (the whole batch, after every invoke's edits: the way to lens a patched run).
In a remote body, ``lp`` pickles as a server-side namespace holding just the in-trace entry points (see
``lens_plugins._Package``), so the server never imports lens_plugins.

Importing this module registers the modules of ``lens_plugins.core.SHIPPED`` with ``nnsight.register``: they
ship by source and import only torch, so the server needs nothing of ours. A lens (``lens=``) reaches a
remote trace as tensors: ``lens_tensors(model, lens, ...)`` inside a hand-written body, automatically in
``run_logit_lens`` / ``run_logit_diff``.
"""

import importlib
from collections.abc import Sequence
from typing import Optional, Union

import nnsight
import torch
from torch import Tensor

from lens_plugins import core
from lens_plugins.attribution import (
    Attribution, LogitDiff, TokenSet, logit_diff_from_saved, result_from_saved,
)
from lens_plugins.core import architectures, lenses as core_lenses, rows as row_plan, trace
from lens_plugins.core.reductions import DEFAULT_LENS as DEFAULT_LENS_REDUCTIONS
from lens_plugins.core.trace import attribution, logit_diff, logit_lens
from lens_plugins.decoder import Decoder
from lens_plugins.logit_lens import DEFAULT_TOP_K, LensRequest, assemble, check_context, check_prompts, eval_mode
from lens_plugins.models import context_length
from lens_plugins.result import LensResult
from lens_plugins.typecheck import typechecked

SHIPPED_MODULES = tuple(importlib.import_module(f"lens_plugins.core.{name}") for name in core.SHIPPED)
for _module in SHIPPED_MODULES:
    nnsight.register(_module)

__all__ = [
    "logit_lens", "logit_diff", "attribution", "run_logit_lens", "run_logit_diff", "run_attribution",
    "result", "logit_diff_result", "attribution_result", "decoder_for", "lens_tensors", "wrap_model", "remote_model",
    "RemoteLensError", "generation_lens", "generation_result", "run_generation_lens", "dola", "dola_output",
    "dola_generate", "decoder_lens", "decoder_lens_result", "run_decoder_lens", "patchscope",
]

Sublayers = Union[bool, str]


class RemoteLensError(RuntimeError):
    """A remote lens did not come back: the server was unreachable, the job failed, or it timed out."""


def wrap_model(model: torch.nn.Module, tokenizer, **kwargs):
    """An nnsight ``TransformersModel`` (task ``text-generation``) around an already-loaded HF causal LM."""
    from nnsight.modeling.transformers import TransformersModel

    return TransformersModel(model, tokenizer=tokenizer, task="text-generation", **kwargs)


def remote_model(path_or_repo_id: str, tokenizer=None, **kwargs):
    """An nnsight ``TransformersModel`` for remote traces, without loading its weights here.

    Passes the tokenizer that nnsight 0.8.1 cannot find by itself with transformers >= 5.24 ("Impossible to
    guess which tokenizer to use"): ``tokenizer`` or ``AutoTokenizer.from_pretrained(path_or_repo_id)``
    (tokenizer files only). A local directory is its own repo id, so nnsight does not ask the model hub to
    canonicalise it; the server then loads that same path, as a local NDIF server (``make ndif-up``) does.
    ``remote=False`` still works: the weights load on first local use.
    """
    from pathlib import Path

    from nnsight.modeling.huggingface import _ID_CACHE
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    name = str(path_or_repo_id)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(name)
    if Path(name).is_dir():
        _ID_CACHE.setdefault(name, name)
    model = TransformersModel(name, tokenizer=tokenizer, task="text-generation", **kwargs)
    model._module.eval()  # as from_pretrained leaves it (the server's copy, and this one once loaded)
    return model


@typechecked
def decoder_for(model, paths: Optional[dict] = None) -> Decoder:
    """The lens decoder of an HF model or nnsight model, outside any trace (the same tensors the in-trace
    lens reads), e.g. to decode a saved activation with ``Decoder.logits``."""
    hf = getattr(model, "_module", model)
    spec = architectures.resolve(hf, paths)
    tensors = architectures.decoder_tensors(hf, spec)
    detached = {k: v.detach().float() if isinstance(v, Tensor) else v for k, v in tensors.items()}
    return Decoder(**detached)


@typechecked
def lens_tensors(
    model,
    lens,
    *,
    layers: Optional[Sequence[Union[int, str]]] = None,
    resid_mid: bool = False,
    sublayers: Sublayers = False,
    paths: Optional[dict] = None,
) -> dict:
    """An affine lens as the tensors a remote trace body can carry (``lens=`` of the in-trace entry points),
    for the rows that ``layers`` / ``resid_mid`` / ``sublayers`` choose. A lens without ``affine`` cannot
    run on a server: it is refused here, by name."""
    if getattr(lens, "affine", None) is None:
        raise TypeError(
            f"{type(lens).__name__} has no affine(rows, d_model), so it cannot run in a remote trace (the server "
            "has none of its code): run it locally (remote=False), or give it an affine form")
    hf = getattr(model, "_module", model)
    spec = architectures.resolve(hf, paths)
    n_layers = len(architectures.get_path(hf, spec["layers"]))
    every = row_plan.plan(n_layers, resid_mid, sublayers, architectures.is_parallel(hf, spec))
    chosen = row_plan.select(every, layers)
    weight, bias = lens.affine(chosen, architectures.decoder_tensors(hf, spec)["W_U"].shape[0])
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    return core_lenses.shipped(detach(weight), detach(bias), [row.label for row in chosen])


@typechecked
def result(lens: dict, model) -> LensResult:
    """The ``LensResult`` of a lens saved inside a trace (``model`` supplies the tokenizer for labels).

    Positions where every prompt of the batch is padding are kept; a padded position of one prompt has
    no next token (NaN log-prob, rank -1); compare prompts of different lengths at their real positions
    (``lens["attention_mask"]``).
    """
    if not isinstance(lens, dict) or lens.get("format") != trace.FORMAT:
        raise TypeError(
            f"expected what logit_lens(model, ...) returned inside a trace, got {type(lens).__name__}; "
            "did the trace run (a remote job that failed leaves nothing)?"
        )
    tokenizer = getattr(model, "tokenizer", model)
    return assemble(lens["stats"], LensRequest.from_dict(lens["request"]), lens["labels"],
                    lens["token_ids"].to(torch.long), tokenizer, lens["attention_mask"].to(torch.long))


@typechecked
def logit_diff_result(saved: dict, model) -> LogitDiff:
    """The ``LogitDiff`` of what ``logit_diff(model, ...)`` saved inside a trace."""
    return logit_diff_from_saved(saved, getattr(model, "tokenizer", model))


@typechecked
def attribution_result(saved: dict, model, by: str = "component") -> Attribution:
    """The ``Attribution`` of what ``attribution(model, ...)`` saved inside a trace (``model`` supplies the
    tokenizer for the target names); ``by`` is ``"component"``, ``"layer"`` or ``"head"``."""
    return result_from_saved(saved, getattr(model, "tokenizer", model), by=by)


def _trace(model, prompt, remote, backend, body, padding_side=None):
    """Run ``body()`` inside ``model.trace(prompt)`` with the one-call guards (prompts, context, eval mode),
    a batch padded on ``padding_side`` (default the tokenizer's, as on TransformerLens), and name a remote
    failure."""
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    prompts = check_prompts(prompt)
    tokenizer = model.tokenizer
    check_context(max(len(ids) for ids in tokenizer(prompts)["input_ids"]), context_length(model))
    trace_kwargs = {"remote": remote} if backend is None else {"backend": backend}
    side = tokenizer.padding_side
    tokenizer.padding_side = padding_side or side  # the batch is tokenized when the trace starts
    try:
        with eval_mode(getattr(model, "_module", model)), model.trace(prompt, **trace_kwargs):
            saved = body()
    except Exception as error:  # noqa: BLE001 - re-raised below with what happened, unless it is ours
        raise _remote_error(error, remote, backend) from error
    finally:
        tokenizer.padding_side = side
    return saved


def _shippable(model, lens, remote, backend, **rows):
    """The lens as it can travel: itself for a local trace, its tensors for a remote one."""
    if lens is None or (remote is False and backend is None):
        return lens
    return lens_tensors(model, lens, **rows)


@typechecked
def run_logit_lens(
    model,
    prompt: Union[str, list[str]],
    *,
    remote: Union[bool, str] = False,
    backend=None,
    resid_mid: bool = False,
    sublayers: Sublayers = False,
    layers: Optional[Sequence[Union[int, str]]] = None,
    top_k: int = DEFAULT_TOP_K,
    targets: Sequence[Union[str, int]] = (),
    positions: Optional[Union[int, Sequence[int]]] = None,
    token_sets: Optional[dict] = None,
    reductions: Sequence[str] = DEFAULT_LENS_REDUCTIONS,
    lens=None,
    paths: Optional[dict] = None,
    vocab_chunk: Optional[int] = None,
    token_chunk: Optional[int] = None,
    precision: str = "float32",
    padding_side: Optional[str] = None,
) -> LensResult:
    """Trace ``prompt`` (one string or a batch) and return its lens: the one-call form.

    ``remote``/``backend`` go to ``model.trace``. A remote failure raises ``RemoteLensError`` naming what
    happened (unreachable host, job error, timeout); the model, prompt and arguments are untouched, so the
    call can simply be retried, or run with ``remote=False``.

    A batch is padded on ``padding_side`` ("left" or "right"; default the tokenizer's) and run with its
    attention mask (padding is marked in ``result.attention_mask`` and scores nothing). A prompt longer than
    the model's context is refused before tracing; a model in training mode runs in eval mode for the call, with a warning.
    """
    rows = dict(layers=layers, resid_mid=resid_mid, sublayers=sublayers, paths=paths)
    lens = _shippable(model, lens, remote, backend, **rows)
    saved = _trace(model, prompt, remote, backend, lambda: logit_lens(
        model, top_k=top_k, targets=list(targets), positions=positions, token_sets=token_sets,
        reductions=tuple(reductions), lens=lens, vocab_chunk=vocab_chunk, token_chunk=token_chunk,
        precision=precision, **rows), padding_side)
    return result(saved, model)


@typechecked
def run_logit_diff(
    model,
    prompt: Union[str, list[str]],
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
) -> LogitDiff:
    """Trace ``prompt`` and return the lens's ``target`` minus ``distractor`` at every row and position:
    the one-call form of ``logit_diff``, with ``run_logit_lens``'s guards."""
    rows = dict(layers=layers, resid_mid=resid_mid, sublayers=sublayers, paths=paths)
    lens = _shippable(model, lens, remote, backend, **rows)
    saved = _trace(model, prompt, remote, backend,
                   lambda: logit_diff(model, target, distractor, positions=positions, lens=lens, **rows),
                   padding_side)
    return logit_diff_result(saved, model)


@typechecked
def run_attribution(
    model,
    prompt: Union[str, list[str]],
    target: TokenSet,
    distractor: Optional[TokenSet] = None,
    *,
    by: str = "component",
    position: int = -1,
    remote: Union[bool, str] = False,
    backend=None,
    paths: Optional[dict] = None,
    padding_side: Optional[str] = None,
) -> Attribution:
    """Trace ``prompt`` and return the direct logit attribution of ``target`` (minus ``distractor``) at
    ``position``: the one-call form, with ``run_logit_lens``'s guards (context length, padding with its
    mask, eval mode) and its remote errors."""
    saved = _trace(model, prompt, remote, backend,
                   lambda: attribution(model, target, distractor, position=position, paths=paths), padding_side)
    return attribution_result(saved, model, by=by)


def _remote_error(error: Exception, remote, backend) -> Exception:
    """Name a remote failure; leave a local error (a bad target, a wrong path) as it is."""
    if remote is False and backend is None:
        return error
    from nnsight.intervention.backends.remote import RemoteError

    kind = type(error).__name__
    message = str(error).lower()
    # NDIF says "Your job exceeded the execution timeout of 20.0s." when it stops a job itself.
    timed_out = "timed out" in message or "execution timeout" in message
    if isinstance(error, TimeoutError) or timed_out or "Timeout" in kind:
        what = "the remote job timed out"
    elif isinstance(error, RemoteError) and "Failed to send request" in str(error) or isinstance(error, OSError):
        what = "the NDIF server could not be reached"
    elif isinstance(error, RemoteError):
        what = "the remote job failed on the server"
    else:
        return error
    return RemoteLensError(
        f"{what}: {kind}: {error}. Nothing local was changed; retry later, check nnsight.CONFIG.API.HOST and "
        "your API key, or run the same lens locally with remote=False."
    )


# The verbs of the other methods (their in-trace halves in core/, their local sides in their own modules).
from lens_plugins.adapters.nnsight_decoder_lens import decoder_lens_result, run_decoder_lens  # noqa: E402
from lens_plugins.adapters.nnsight_generation import (  # noqa: E402
    dola_generate, dola_output, generation_result, run_generation_lens,
)
from lens_plugins.core.decoder_lens import decoder_lens  # noqa: E402
from lens_plugins.core.dola_trace import dola  # noqa: E402
from lens_plugins.core.generation import generation_lens  # noqa: E402
from lens_plugins.adapters.patchscope_nnsight import patchscope  # noqa: E402 - it builds on this module
