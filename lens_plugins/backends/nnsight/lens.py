"""The logit lens inside nnsight traces, local or on NDIF: the caller's side.

Usage (the same code for ``remote=False``, ``remote="local"`` and ``remote=True``)::

    import lens_plugins as lp

    model = lp.load_default_model(backend="nnsight")       # or lp.nnsight.wrap_model(hf_model, tokenizer)
    with model.trace("The capital of France is"):
        lens = lp.nnsight.logit_lens(model, top_k=10, targets=[" Paris"])
    result = lp.nnsight.logit_lens_result(lens, model)      # a LensResult, as from TransformerLens

``logit_lens`` runs inside the trace, on whatever machine runs it (``core/trace/lens.py``): it reads the rows
of the same row plan as TransformerLens, runs the same pipeline with the same request and checks, and saves
only the reductions. ``logit_lens_result`` labels them locally; ``run_logit_lens`` is the one-call form.
With several prompts, call the lens in each ``tracer.invoke(prompt)`` (that prompt's rows), or once in an
empty ``tracer.invoke()`` (the whole batch, after every invoke's edits: the way to lens a patched run). In a
remote body, ``lp`` pickles as a server-side namespace holding just the in-trace entry points
(``core/trace/namespace.py``), so the server never imports lens_plugins. A lens (``lens=``) reaches a remote
trace as tensors: ``lens_tensors(model, lens, ...)`` inside a hand-written body, automatically in
``run_logit_lens``.
"""

from collections.abc import Sequence
from typing import Optional, Union

import torch

from lens_plugins.backends._common import Prompt, one_at_a_time
from lens_plugins.backends.nnsight._run import RemoteJob, run, shippable
from lens_plugins.backends.nnsight.reader import Sublayers
from lens_plugins.core.errors import LensTypeError
from lens_plugins.core.reductions import DEFAULT_LENS as DEFAULT_LENS_REDUCTIONS
from lens_plugins.core.trace import lens as trace_lens
from lens_plugins.core.trace.lens import logit_lens
from lens_plugins.core.request import check_reductions
from lens_plugins.methods.lens import DEFAULT_TOP_K, LensRequest, assemble
from lens_plugins.methods.result import LensResult
from lens_plugins.typecheck import typechecked


@typechecked
def logit_lens_result(lens: dict, model) -> LensResult:
    """The ``LensResult`` of a lens saved inside a trace (``model`` supplies the tokenizer for labels).

    Positions where every prompt of the batch is padding are kept; a padded position of one prompt has
    no next token (NaN log-prob, rank -1); compare prompts of different lengths at their real positions
    (``lens["attention_mask"]``).

    Args:
        lens: what ``lp.nnsight.logit_lens`` saved in the trace.
        model: the nnsight model that ran the trace (for the tokenizer).

    Returns:
        A ``LensResult``.
    """
    if not isinstance(lens, dict) or lens.get("format") != trace_lens.FORMAT:
        raise LensTypeError(
            f"expected what logit_lens(model, ...) returned inside a trace, got {type(lens).__name__}; "
            "did the trace run (a remote job that failed leaves nothing)?"
        )
    tokenizer = getattr(model, "tokenizer", model)
    return assemble(lens["stats"], LensRequest.from_dict(lens["request"]), lens["labels"],
                    lens["token_ids"].to(torch.long), tokenizer, lens["attention_mask"].to(torch.long))


@one_at_a_time
@typechecked
def run_logit_lens(
    model,
    prompt: Prompt,
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
    prepend_bos: Optional[bool] = None,
    auto_tokens: int = 0,
    blocking: bool = True,
) -> Union[LensResult, RemoteJob]:
    """Trace ``prompt`` (one string or a batch) and return its lens: the one-call form.

    ``remote``/``backend`` go to ``model.trace``. A remote failure raises ``RemoteLensError`` naming what
    happened (unreachable host, job error, timeout); the model, prompt and arguments are untouched, so the
    call can simply be retried, or run with ``remote=False``.

    A batch is padded on ``padding_side`` ("left" or "right"; default the tokenizer's) and run with its
    attention mask (padding is marked in ``result.attention_mask`` and scores nothing). ``prepend_bos``
    (``None``: as the model's own Hugging Face tokenizer does, as your own traces do; ``True``: exactly one BOS;
    ``False``: none) is the one tokenization rule of both backends, so TransformerLens's ``run_logit_lens``
    runs the same ids (``backends._common.prompt_ids``). A prompt longer than the model's context is refused
    before tracing; a model in training mode runs in eval mode for the call, with a warning.

    ``blocking=False`` (with ``remote=True``) submits the job and returns a ``RemoteJob`` at once: ``job_id``,
    ``status()``, ``result()`` (this ``LensResult``, when it is ready), ``cancel()``.

    Args:
        model: an nnsight ``LanguageModel`` / ``TransformersModel`` (``lp.nnsight.wrap_model``, ``remote_model``).
        prompt: a text or a list of texts, or model inputs (a processor's output: ``input_ids``, ``pixel_values`` ...).
        remote: ``False`` (local), ``True`` (NDIF) or ``"local"`` (nnsight's serialisation, run locally).
        backend: an nnsight backend passed to the trace.
        resid_mid: also decode after each block's attention.
        sublayers: decode after every sublayer (``True``) or their outputs (``"outputs"``).
        layers: rows to keep, by index or label.
        top_k: tokens kept per row and position.
        targets: single tokens whose rank and log-prob are reported.
        positions: positions to decode; default all.
        token_sets: ``{name: [tokens]}``.
        reductions: what to compute, by name.
        lens: a map applied to each row (a tuned lens ships as tensors to a remote trace).
        paths: module paths for a family the architecture table does not know.
        vocab_chunk: vocabulary columns per tile.
        token_chunk: vectors per tile.
        precision: ``"float32"``, ``"tf32"`` or ``"bf16x3"``.
        padding_side: ``"left"`` or ``"right"`` for a batch.
        prepend_bos: ``None`` (as the tokenizer does), ``True`` or ``False``.

    Returns:
        The same ``LensResult`` as ``lp.transformer_lens.run_logit_lens`` gives for the same ids.

    Raises:
        RemoteLensError: a remote trace failed (server unreachable, job failed, timed out).
        LensValueError: a bad option, an empty or too long prompt.
    """
    rows = dict(layers=layers, resid_mid=resid_mid, sublayers=sublayers, paths=paths)
    lens = shippable(model, lens, remote, backend, **rows)
    return run(model, prompt, remote, backend, lambda: logit_lens(
        model, top_k=top_k, targets=list(targets), positions=positions, token_sets=token_sets,
        reductions=check_reductions(reductions), lens=lens, vocab_chunk=vocab_chunk, token_chunk=token_chunk,
        precision=precision, auto_tokens=auto_tokens, **rows), lambda saved: logit_lens_result(saved, model),
        blocking, padding_side, prepend_bos)

__all__ = ["logit_lens_result", "run_logit_lens"]
