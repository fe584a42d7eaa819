"""Patchscopes on nnsight models, locally or on NDIF: the same verbs as the TransformerLens adapter.

Around ``model.trace``: one trace of the source prompt saves its residual rows at the chosen positions
(``remote_patchscope.read_source``); the mapping is applied here (it may be any local callable); then one
trace per batch of pairs runs ``remote_patchscope.patch_and_read`` on copies of the target prompt, writing a
layer's input ("3_pre", "embed") or output ("29_post") and reducing the result where the model runs, so
only the reductions come back. Inside your own trace, call ``remote_patchscope.patch_and_read`` directly.

Importing this module registers ``lens_plugins.remote_patchscope`` and ``lens_plugins.core.patching`` with
``nnsight.register`` (and, through ``adapters.nnsight``, the modules they import), so a remote trace ships them
by source.
"""

from collections.abc import Sequence
from typing import Optional, Union

import nnsight
import torch
from jaxtyping import Int
from torch import Tensor

from lens_plugins import remote_patchscope
from lens_plugins import tokens as token_utils
from lens_plugins.adapters.nnsight import _remote_error
from lens_plugins.core import patching
from lens_plugins.logit_lens import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK, TokenSets, check_prompts, eval_mode
from lens_plugins.models import context_length
from lens_plugins.patchscopes import (
    IDENTITY_PROMPT, Mapping, PatchscopeResult, RowSpec, TargetRunner, plan, readout_reductions, run,
)
from lens_plugins.prompt import DEFAULT_LENS_REDUCTIONS
from lens_plugins.remote_patchscope import patch_and_next_token, patch_and_read, read_source
from lens_plugins.typecheck import typechecked

for _module in (patching, remote_patchscope):
    nnsight.register(_module)


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
        position, top_k, reductions = self.request.target_position, self.request.top_k, readout_reductions(self.request)
        labels = list(target_labels)
        with model.trace(self.tokens.expand(values.shape[0], -1), **self.trace_kwargs):
            saved = patch_and_read(model, values, labels, position, reference, target_ids, top_k, reductions,
                                   read_next_token, **paths, **chunks)
        return saved["stats"], saved.get("next_token")

    def next_tokens(self, tokens, values, target_labels):
        model, paths, position, labels = self.model, self.paths, self.request.target_position, list(target_labels)
        with model.trace(tokens, **self.trace_kwargs):
            ids = patch_and_next_token(model, values, labels, position, **paths)
        return ids


@typechecked
def patchscope(
    model,
    source: Union[str, Int[Tensor, "1 seq"]],
    *,
    layers: Optional[Sequence[RowSpec]] = None,
    positions: Optional[Union[int, Sequence[int]]] = None,
    target_prompt: Union[str, Int[Tensor, "target_seq"]] = IDENTITY_PROMPT,
    target_layer: Optional[RowSpec] = None,
    target_position: int = -1,
    mapping: Mapping = None,
    top_k: int = 5,
    targets: Sequence[token_utils.TargetSpec] = (),
    token_sets: Optional[TokenSets] = None,
    reductions: Sequence[str] = DEFAULT_LENS_REDUCTIONS,
    batch_size: int = 64,
    max_new_tokens: int = 0,
    remote: Union[bool, str] = False,
    backend=None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    module_layers: Optional[str] = None,
    final_norm: Optional[str] = None,
    lm_head: Optional[str] = None,
) -> PatchscopeResult:
    """The Patchscope of ``source`` (a prompt, or its token ids ``[1, seq]``) on an nnsight ``model``; the
    options are those of ``adapters.patchscope_transformer_lens.patchscope``. ``remote`` / ``backend`` go to every
    ``model.trace`` (the source trace and one per batch of pairs); ``module_layers`` / ``final_norm`` /
    ``lm_head`` are module paths for a family ``lens_plugins.architectures`` does not know."""
    trace_kwargs = {"remote": remote} if backend is None else {"backend": backend}
    paths = {"layers": module_layers, "final_norm": final_norm, "lm_head": lm_head}
    tokenizer = model.tokenizer
    if isinstance(source, str):
        check_prompts(source)
        source = tokenizer(source, return_tensors="pt")["input_ids"]
    if isinstance(target_prompt, str):
        check_prompts(target_prompt)
        target_ids = tokenizer(target_prompt, return_tensors="pt")["input_ids"][0]
    else:
        target_ids = target_prompt
    hf = getattr(model, "_module", model)
    try:
        with eval_mode(hf):
            with model.trace(source, **trace_kwargs):
                saved = read_source(model, list(range(source.shape[1])), **paths)
            labels = saved["labels"]
            d_vocab = nnsight_decoder_vocab(hf, paths)
            request = plan(
                labels, source.shape[1], target_ids.shape[0], tokenizer, d_vocab, layers=layers, positions=positions,
                target_layer=target_layer, target_position=target_position, targets=targets, token_sets=token_sets,
                reductions=reductions, top_k=top_k, batch_size=batch_size, max_new_tokens=max_new_tokens,
                context=context_length(model),
            )
            stack = saved["hidden"]  # [rows, seq, d]
            hidden = stack[request.rows][:, request.lens.positions]
            reference = stack[-1, request.lens.positions]
            runner = _Runner(model, request, target_ids, trace_kwargs, paths, vocab_chunk, token_chunk)
            return run(runner, request, hidden.float(), reference.float(), saved["token_ids"].to(torch.long),
                       target_ids.to(torch.long),
                       target_prompt if isinstance(target_prompt, str) else tokenizer.decode(target_ids.tolist()),
                       tokenizer, mapping)
    except Exception as error:  # noqa: BLE001 - re-raised with what happened if it is a remote failure
        raise _remote_error(error, remote, backend) from error


def nnsight_decoder_vocab(hf, paths) -> int:
    """The decoder's vocabulary size, read from the local module tree (no trace)."""
    from lens_plugins.architectures import decoder_tensors, resolve

    return decoder_tensors(hf, resolve(hf, **paths))["W_U"].shape[1]
