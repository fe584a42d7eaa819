"""The logit lens inside nnsight traces, local or on NDIF.

Usage (the same code for ``remote=False``, ``remote="local"`` and ``remote=True``)::

    import lens_plugins as lp

    model = lp.load_default_model(backend="nnsight")       # or lp.nnsight.wrap_model(hf_model, tokenizer)
    with model.trace("The capital of France is"):
        lens = lp.nnsight.logit_lens(model, top_k=10, targets=[" Paris"])
    result = lp.nnsight.result(lens, model)                 # a LensResult, as from TransformerLens

``logit_lens`` runs inside the trace, on whatever machine runs it: it reads each layer's input and the last
layer's output, decodes them with the model's own final norm and ``lm_head`` (never uploaded), and saves only
the reductions (top-k, entropy, KL, ranks). ``result`` labels them locally. With several prompts, call it in
each ``tracer.invoke(prompt)`` (that prompt's rows), or once in an empty ``tracer.invoke()`` (the whole batch,
after every invoke's edits: the way to lens a patched run, since the lens must read layer 0 before anything
later in its own block). In a remote body, ``lp`` pickles as a server-side namespace holding just the
in-trace lens (see ``lens_plugins._Package``), so the server never imports lens_plugins.

Importing this module registers ``lens_plugins.remote``, ``.architectures``, ``.prompt`` and ``.readout`` with
``nnsight.register``: they ship by source and import only torch, so the server needs nothing of ours.
"""

from collections.abc import Sequence
from typing import Optional, Union

import nnsight
import torch
from torch import Tensor

from lens_plugins import architectures, prompt, readout, remote, remote_attribution
from lens_plugins.attribution import Attribution, TokenSet, result_from_saved
from lens_plugins.decoder import Decoder
from lens_plugins.logit_lens import LensRequest, assemble, check_context, check_prompts, eval_mode
from lens_plugins.models import context_length
from lens_plugins.remote import logit_lens
from lens_plugins.remote_attribution import attribution
from lens_plugins.result import LensResult
from lens_plugins.typecheck import typechecked

SHIPPED_MODULES = (remote, architectures, prompt, readout, remote_attribution)
for _module in SHIPPED_MODULES:
    nnsight.register(_module)

__all__ = [
    "logit_lens", "result", "run_logit_lens", "wrap_model", "remote_model", "decoder_for", "RemoteLensError",
    "attribution", "attribution_result", "run_attribution",
]


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
def decoder_for(
    model, layers: Optional[str] = None, final_norm: Optional[str] = None, lm_head: Optional[str] = None
) -> Decoder:
    """The lens decoder of an HF model or nnsight model, outside any trace (the same tensors the in-trace
    lens reads), e.g. to decode a saved activation with ``Decoder.logits``."""
    hf = getattr(model, "_module", model)
    spec = architectures.resolve(hf, layers, final_norm, lm_head)
    tensors = architectures.decoder_tensors(hf, spec)
    detached = {k: v.detach().float() if isinstance(v, Tensor) else v for k, v in tensors.items()}
    return Decoder(**detached)


@typechecked
def result(lens: dict, model) -> LensResult:
    """The ``LensResult`` of a lens saved inside a trace (``model`` supplies the tokenizer for labels).

    Positions where every prompt of the batch is padding are kept; a padded position of one prompt has
    no next token (NaN log-prob, rank -1); compare prompts of different lengths at their real positions
    (``lens["attention_mask"]``).
    """
    if not isinstance(lens, dict) or lens.get("format") != remote.FORMAT:
        raise TypeError(
            f"expected what logit_lens(model, ...) returned inside a trace, got {type(lens).__name__}; "
            "did the trace run (a remote job that failed leaves nothing)?"
        )
    tokenizer = getattr(model, "tokenizer", model)
    names = [n if n is not None else tokenizer.decode([i]) for n, i in zip(lens["target_names"], lens["target_ids"])]
    request = LensRequest(
        positions=lens["positions"], reductions=tuple(lens["reductions"]), target_names=names,
        target_ids=list(lens["target_ids"]), set_names=lens["set_names"], set_ids=lens["set_ids"],
    )
    return assemble(lens["stats"], request, lens["labels"], lens["token_ids"].to(torch.long), tokenizer,
                    lens["attention_mask"].to(torch.long))


@typechecked
def run_logit_lens(
    model,
    prompt: Union[str, list[str]],
    *,
    remote: Union[bool, str] = False,
    top_k: int = 10,
    targets: Sequence[Union[str, int]] = (),
    positions: Optional[Union[int, Sequence[int]]] = None,
    token_sets: Optional[dict] = None,
    reductions: Sequence[str] = prompt.DEFAULT_LENS_REDUCTIONS,
    backend=None,
    **paths,
) -> LensResult:
    """Trace ``prompt`` (one string or a batch) and return its lens: the one-call form.

    ``remote``/``backend`` go to ``model.trace``. A remote failure raises ``RemoteLensError`` naming what
    happened (unreachable host, job error, timeout); the model, prompt and arguments are untouched, so the
    call can simply be retried, or run with ``remote=False``.

    A batch is padded on the tokenizer's ``padding_side`` and run with its attention mask (padding is
    marked in ``result.attention_mask`` and scores nothing). A prompt longer than the model's context is
    refused before tracing; a model in training mode runs in eval mode for the call, with a warning.
    """
    prompts = check_prompts(prompt)
    check_context(max(len(ids) for ids in model.tokenizer(prompts)["input_ids"]), context_length(model))
    trace_kwargs = {"remote": remote} if backend is None else {"backend": backend}
    try:
        with eval_mode(getattr(model, "_module", model)), model.trace(prompt, **trace_kwargs):
            lens = logit_lens(model, top_k=top_k, targets=list(targets), positions=positions,
                              token_sets=token_sets, reductions=tuple(reductions), **paths)
    except Exception as error:  # noqa: BLE001 - re-raised below with what happened, unless it is ours
        raise _remote_error(error, remote, backend) from error
    return result(lens, model)


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


@typechecked
def attribution_result(saved: dict, model, by: str = "component") -> Attribution:
    """The ``Attribution`` of what ``attribution(model, ...)`` saved inside a trace (``model`` supplies the
    tokenizer for the target names); ``by`` is ``"component"``, ``"layer"`` or ``"head"``."""
    return result_from_saved(saved, getattr(model, "tokenizer", model), by=by)


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
    **paths,
) -> Attribution:
    """Trace ``prompt`` and return the direct logit attribution of ``target`` (minus ``distractor``) at
    ``position``: the one-call form. Remote failures raise ``RemoteLensError``, as ``run_logit_lens``."""
    check_prompts(prompt)
    trace_kwargs = {"remote": remote} if backend is None else {"backend": backend}
    try:
        with model.trace(prompt, **trace_kwargs):
            saved = attribution(model, target, distractor, position=position, **paths)
    except Exception as error:  # noqa: BLE001 - re-raised below with what happened, unless it is ours
        raise _remote_error(error, remote, backend) from error
    return attribution_result(saved, model, by=by)
