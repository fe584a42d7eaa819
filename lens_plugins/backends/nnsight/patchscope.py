"""Patchscopes on nnsight models, locally or on NDIF: ``lp.nnsight.patchscope``, the same verb and options as
``lp.transformer_lens.patchscope``.

The call is planned here before any trace (the row plan of ``core.rows`` from the local module tree, the lens
request of ``core.request.build``), so bad input is refused before anything is sent. Then one trace of the
source prompt saves just the chosen rows at the chosen positions (``core/trace/patchscope.read_source``);
the mapping is applied here (it may be any local callable); and one trace per batch of pairs runs
``patch_and_read`` on copies of the target prompt, writing a layer's input ("3_pre", "embed") or output
("29_post") and reducing the result where the model runs, so only the reductions come back. Inside your own
trace, call ``lens_plugins.core.trace.patchscope.patch_and_read`` directly: it ships by source with core.
"""

from collections.abc import Sequence
from typing import Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor

from lens_plugins import tokens as token_utils
from lens_plugins.backends._common import (
    check_context,
    check_prompts,
    context_length,
    eval_mode,
    one_at_a_time,
    prompt_ids,
    unwrap,
)
from lens_plugins.backends.nnsight._run import remote_error
from lens_plugins.core import architectures
from lens_plugins.core import verification
from lens_plugins.core.errors import LensValueError
from lens_plugins.core import rows as row_plan
from lens_plugins.core.reductions import DEFAULT_LENS as DEFAULT_LENS_REDUCTIONS
from lens_plugins.core.trace.patchscope import patch_and_next_token, patch_and_read, read_source
from lens_plugins.methods.lens import DEFAULT_TOKEN_CHUNK, DEFAULT_TOP_K, DEFAULT_VOCAB_CHUNK, TokenSets
from lens_plugins.methods.patchscope import IDENTITY_PROMPT, Mapping, PatchscopeResult, RowSpec, TargetRunner, plan, run
from lens_plugins.typecheck import typechecked


class _Runner(TargetRunner):
    def __init__(self, model, request, target_ids, trace_kwargs, paths, vocab_chunk, token_chunk):
        self.model = model
        self.request = request
        self.tokens = target_ids.reshape(1, -1)
        self.trace_kwargs = trace_kwargs
        self.paths = paths
        self.chunks = dict(vocab_chunk=vocab_chunk, token_chunk=token_chunk)

    # The trace bodies name only plain values and shipped functions: a remote trace pickles what they name.
    def read(self, values, target_labels, reference, target_ids, read_next_token):
        model, paths, chunks = self.model, self.paths, self.chunks
        position, top_k, reductions = self.request.target_position, self.request.lens.top_k, self.request.readout
        labels = list(target_labels)
        with torch.no_grad(), model.trace(self.tokens.expand(values.shape[0], -1), **self.trace_kwargs):
            saved = patch_and_read(model, values, labels, position, reference, target_ids, top_k, reductions,
                                   read_next_token, paths, **chunks)
        return saved["stats"], saved.get("next_token")

    def next_tokens(self, tokens, values, target_labels):
        model, paths, position, labels = self.model, self.paths, self.request.target_position, list(target_labels)
        with torch.no_grad(), model.trace(tokens, **self.trace_kwargs):
            ids = patch_and_next_token(model, values, labels, position, paths)
        return ids


@one_at_a_time
@typechecked
def run_patchscope(
    model,
    source: Union[str, Int[Tensor, "1 seq"]],
    *,
    layers: Optional[Sequence[RowSpec]] = None,
    positions: Optional[Union[int, Sequence[int]]] = None,
    target_prompt: Union[str, Int[Tensor, "target_seq"]] = IDENTITY_PROMPT,
    target_layer: Optional[RowSpec] = None,
    target_position: int = -1,
    mapping: Mapping = None,
    top_k: int = DEFAULT_TOP_K,
    targets: Sequence[token_utils.TargetSpec] = (),
    token_sets: Optional[TokenSets] = None,
    reductions: Sequence[str] = DEFAULT_LENS_REDUCTIONS,
    batch_size: int = 64,
    max_new_tokens: int = 0,
    remote: Union[bool, str] = False,
    backend=None,
    paths: Optional[dict] = None,
    vocab_chunk: Optional[int] = DEFAULT_VOCAB_CHUNK,
    token_chunk: Optional[int] = DEFAULT_TOKEN_CHUNK,
    prepend_bos: Optional[bool] = None,
    progress: bool = False,
    target_model=None,
) -> PatchscopeResult:
    """The Patchscope of ``source`` (a prompt, or its token ids ``[1, seq]``) on an nnsight ``model``; the
    options are those of ``lp.transformer_lens.patchscope``. ``remote`` / ``backend`` go to every
    ``model.trace`` (the source trace and one per batch of pairs); ``paths`` holds module paths
    (``{"layers": ..., "final_norm": ..., "lm_head": ...}``) for a family ``core.architectures`` does not know.
    Source and target text are tokenized with ``prepend_bos`` as in ``run_logit_lens``; ``progress`` draws a bar
    over the (row, position) pairs (one target trace per batch of them, also remote). ``target_model``:
    another nnsight model that reads the source's hidden states, as on TransformerLens (its traces take the
    same ``remote`` / ``backend``, so either model may run remotely)."""

    trace_kwargs = {"remote": remote} if backend is None else {"backend": backend}
    if target_model is not None:
        return _cross_model(model, target_model, source, trace_kwargs, dict(
            layers=layers, positions=positions, target_layer=target_layer, target_position=target_position,
            targets=targets, token_sets=token_sets, reductions=reductions, top_k=top_k, batch_size=batch_size,
            max_new_tokens=max_new_tokens), target_prompt=target_prompt, mapping=mapping, paths=paths,
            chunks=(vocab_chunk, token_chunk), prepend_bos=prepend_bos, remote=remote, backend=backend)
    tokenizer = model.tokenizer
    if isinstance(source, str):
        check_prompts(source)
        source = torch.tensor([prompt_ids(tokenizer, source, prepend_bos)])
    if isinstance(target_prompt, str):
        check_prompts(target_prompt)
        target_ids = torch.tensor(prompt_ids(tokenizer, target_prompt, prepend_bos))
    else:
        target_ids = target_prompt
    check_context(source.shape[1], context_length(model), what="the source prompt")
    check_context(target_ids.shape[0], context_length(model), max_new_tokens, what="the target prompt")
    hf = unwrap(model)
    spec = verification.resolve(hf, paths)
    n_layers = len(architectures.get_path(hf, spec["layers"]))
    every = row_plan.plan(n_layers, parallel=architectures.is_parallel(hf, spec))
    request = plan(
        every, source.shape[1], target_ids.shape[0], tokenizer, architectures.decoder_tensors(hf, spec).d_vocab,
        layers=layers, positions=positions, target_layer=target_layer, target_position=target_position,
        targets=targets, token_sets=token_sets, reductions=reductions, top_k=top_k, batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    labels, chosen_positions = request.labels, request.lens.positions
    try:
        with eval_mode(hf):
            with torch.no_grad(), model.trace(source, **trace_kwargs):
                saved = read_source(model, labels, chosen_positions, paths)
            runner = _Runner(model, request, target_ids, trace_kwargs, paths, vocab_chunk, token_chunk)
            return run(runner, request, saved["hidden"].float(), saved["token_ids"].to(torch.long),
                       target_ids.to(torch.long),
                       target_prompt if isinstance(target_prompt, str) else tokenizer.decode(target_ids.tolist()),
                       tokenizer, mapping, progress=progress)
    except Exception as error:  # noqa: BLE001 - re-raised with what happened if it is a remote failure
        raise remote_error(error, remote, backend) from error

def _rows_of(model, paths):
    """An nnsight model's row plan and decoder vocabulary size, read locally (its module tree)."""
    hf = unwrap(model)
    spec = verification.resolve(hf, paths)
    n_layers = len(architectures.get_path(hf, spec["layers"]))
    return row_plan.plan(n_layers, parallel=architectures.is_parallel(hf, spec)), architectures.decoder_tensors(hf, spec)


def _cross_model(model, target_model, source, trace_kwargs, options, *, target_prompt, mapping, paths, chunks,
                 prepend_bos, remote, backend):
    """``run_patchscope`` with ``target_model`` reading ``model``'s hidden states, as on TransformerLens: one
    trace of the source text on each model (the source rows at the paired positions; the target's final
    row, its own prediction), then the target runs as for one model."""
    from lens_plugins.methods.cross_model import check_same_backend, text_pairs

    check_same_backend(model, target_model)
    if not isinstance(source, str):
        raise LensValueError("with target_model=, pass the source prompt as text: the two models' positions are paired "
                             "by character offsets")
    check_prompts(source)
    target_tokenizer = target_model.tokenizer
    pairs = text_pairs(model.tokenizer, target_tokenizer, source, prepend_bos)
    if isinstance(target_prompt, str):
        check_prompts(target_prompt)
        target_ids = torch.tensor(prompt_ids(target_tokenizer, target_prompt, prepend_bos))
    else:
        target_ids = target_prompt
    check_context(len(pairs.source_ids), context_length(model), what="the source prompt")
    check_context(len(pairs.target_ids), context_length(target_model), what="the source prompt (on the target model)")
    check_context(target_ids.shape[0], context_length(target_model), options["max_new_tokens"], what="the target prompt")
    every, _ = _rows_of(model, paths)
    target_every, decoder = _rows_of(target_model, paths)
    if options["positions"] is None:
        options = {**options, "positions": pairs.target_index.tolist()}
    request = plan(every, len(pairs.target_ids), target_ids.shape[0], target_tokenizer, decoder.d_vocab,
                   target_every=target_every, **options)
    chosen = list(request.lens.positions)
    text_ids = torch.tensor([pairs.target_ids])
    # The trace bodies name only plain values (a remote request pickles what they name, and the server cannot
    # import this package's non-shipped classes): the labels and positions are worked out here.
    labels, source_positions, own_label = list(request.labels), list(pairs.source_positions(chosen)), target_every[-1].label
    try:
        with eval_mode(unwrap(model)), eval_mode(unwrap(target_model)):
            with torch.no_grad(), model.trace(torch.tensor([pairs.source_ids]), **trace_kwargs):
                saved = read_source(model, labels, source_positions, paths)
            with torch.no_grad(), target_model.trace(text_ids, **trace_kwargs):
                own = read_source(target_model, [own_label], chosen, paths)
            runner = _Runner(target_model, request, target_ids, trace_kwargs, paths, *chunks)
            return run(runner, request, saved["hidden"].float(), text_ids, target_ids.to(torch.long),
                       target_prompt if isinstance(target_prompt, str) else target_tokenizer.decode(target_ids.tolist()),
                       target_tokenizer, mapping, reference=own["hidden"][0].float(), width=decoder.d_model)
    except Exception as error:  # noqa: BLE001 - re-raised with what happened if it is a remote failure
        raise remote_error(error, remote, backend) from error

__all__ = ["run_patchscope"]
