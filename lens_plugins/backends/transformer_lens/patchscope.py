"""Patchscopes on TransformerLens models (``TransformerBridge`` and ``HookedTransformer``): ``lp.transformer_lens.patchscope``.

The source rows are the logit lens's, read from a cache (given, or from a run of the source prompt) with the
adapter's reader (``adapters.transformer_lens.reader``: row -> hook name); the target runs with
``run_with_hooks``, one hook per target row writing into the batch items patched there, at the row's own hook
(``hook_name``: "embed" and "3_pre" are ``blocks.L.hook_resid_pre``, "29_post" is ``blocks.29.hook_resid_post``),
and one more reading the last block's output at ``i*``.

``adapters.transformer_lens`` exports ``patchscope`` from here and this module reads through it, so it is
imported inside the functions (either module may be imported first).
"""

from collections.abc import Sequence
from typing import Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor

from lens_plugins import tokens as token_utils
from lens_plugins.backends._common import check_context, check_prompts, context_length, eval_mode, one_at_a_time, prompt_ids
from lens_plugins.backends.transformer_lens import reader as tla
from lens_plugins.backends.transformer_lens.verification import decoder_for
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.pipeline import check_decoder
from lens_plugins.core.patching import patch_row, readout_stack, sites_of, write_rows
from lens_plugins.core.reductions import DEFAULT_LENS as DEFAULT_LENS_REDUCTIONS
from lens_plugins.core.rows import Row
from lens_plugins.methods.lens import DEFAULT_TOKEN_CHUNK, DEFAULT_TOP_K, DEFAULT_VOCAB_CHUNK, TokenSets
from lens_plugins.methods.patchscope import IDENTITY_PROMPT, Mapping, PatchscopeResult, RowSpec, TargetRunner, plan, run
from lens_plugins.typecheck import typechecked


class _Runner(TargetRunner):
    def __init__(self, model, request, target_tokens, vocab_chunk, token_chunk):
        self.hook_name = tla.hook_name
        self.model = model
        self.request = request
        self.tokens = target_tokens
        self.decoder = decoder_for(model)
        check_decoder(self.decoder)  # as nnsight's read-out does: a non-finite decoder is refused, named
        self.final_hook = tla.hook_name(Row(model.cfg.n_layers - 1, "post"))
        self.chunks = (vocab_chunk, token_chunk)

    def _writes(self, values, labels):
        position = self.request.target_position

        def writer(index):
            return lambda act, hook: write_rows(act, index, position, values[index])

        return [(self.hook_name(patch_row(label)), writer(index)) for label, index in sites_of(labels).items()]

    def read(self, values, target_labels, reference, target_ids, read_next_token):
        captured = {}
        position = self.request.target_position

        def capture(act, hook):
            captured["final"] = act[:, position].detach().clone()

        k = values.shape[0]
        logits = self.model.run_with_hooks(self.tokens.expand(k, -1),
                                           fwd_hooks=self._writes(values, target_labels) + [(self.final_hook, capture)])
        stats = self.decoder.statistics(
            readout_stack(captured["final"], reference), target_ids.to(torch.long), self.request.lens.top_k,
            *self.chunks, self.request.readout,
        )
        return stats, logits[:, -1].argmax(-1) if read_next_token else None

    def next_tokens(self, tokens, values, target_labels):
        logits = self.model.run_with_hooks(tokens.to(self.tokens.device), fwd_hooks=self._writes(values, target_labels))
        return logits[:, -1].argmax(-1)


@one_at_a_time
@typechecked
def run_patchscope(
    model,
    source,
    *,
    tokens: Optional[Int[Tensor, "1 seq"]] = None,
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
    vocab_chunk: Optional[int] = DEFAULT_VOCAB_CHUNK,
    token_chunk: Optional[int] = DEFAULT_TOKEN_CHUNK,
    prepend_bos: Optional[bool] = None,
    progress: bool = False,
    target_model=None,
) -> PatchscopeResult:
    """The Patchscope of ``source`` (a prompt, its token ids ``[1, seq]``, or an ``ActivationCache`` of one
    prompt cached with ``hook_filter()``; ``tokens`` overrides the ids recovered from a cache) on a
    TransformerLens ``model``.

    ``layers`` picks source rows by index or label (default all; the final row is always kept); ``positions``
    the source positions (default all). Each (row, position) pair is written into ``target_prompt`` (text, or
    token ids; default the token-identity prompt) at ``target_position`` (default the last token) and row
    ``target_layer`` (default: the source row; an index or label such as ``-1`` / ``"29_post"`` for every
    pair), after ``mapping`` (``None``, a callable on ``[pairs, d]``, or ``(weight, bias)``). The target's
    next-token distribution at ``target_position`` is reduced as by the logit lens (``top_k``, ``targets``,
    ``token_sets``, ``reductions``); ``max_new_tokens`` adds a greedy continuation. ``batch_size`` pairs run
    per target forward. Source and target text are tokenized with ``prepend_bos`` as in ``run_logit_lens``
    (``backends._common.prompt_ids``, as nnsight's ``run_patchscope`` does); token ids run as given.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer``.
        source: the source prompt (text), or an ``ActivationCache`` of it (then pass ``tokens``).
        tokens: the source ids when ``source`` is a cache.
        layers: source rows; default every lens row.
        positions: source positions; default all.
        target_prompt: the prompt the hidden state is written into; default the token-identity prompt.
        target_layer: the row written at (``None``: the source row, ``l* = l``).
        target_position: the position written at; default the placeholder.
        mapping: ``None``, a callable on ``[pairs, d_model]`` or ``(weight, bias)``.
        top_k: tokens kept.
        targets: single tokens whose rank and log-prob are reported.
        token_sets: ``{name: [tokens]}``.
        reductions: what to compute, by name.
        batch_size: (row, position) pairs per target forward pass.
        max_new_tokens: greedy continuation of each patched target (``res.generated``).
        vocab_chunk: vocabulary columns per tile.
        token_chunk: vectors per tile.
        prepend_bos: as ``run_logit_lens``, for source and target.
        progress: a progress bar over the (row, position) pairs (``lens_plugins.progress``; off by default).
        target_model: another TransformerLens model that reads the source's hidden states (``None``: the
            source model). The source must be text: the result's positions and tokens are the target's
            tokenization of it, each paired with the source position that ends at the same character
            (``methods.cross_model``); its reference is the target's own prediction there.

    Returns:
        A ``PatchscopeResult``: a ``LensResult`` whose rows are source rows and columns source positions.

    Raises:
        LensValueError: a prompt that does not fit the context, a bad row, position or mapping.
    """
    if target_model is not None:
        return _cross_model(model, target_model, source, layers=layers, positions=positions,
                            target_prompt=target_prompt, target_layer=target_layer, target_position=target_position,
                            mapping=mapping, top_k=top_k, targets=targets, token_sets=token_sets,
                            reductions=reductions, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            chunks=(vocab_chunk, token_chunk), prepend_bos=prepend_bos)
    if isinstance(source, (str, Tensor)):
        if isinstance(source, str):
            check_prompts(source)
            source = torch.tensor([prompt_ids(tla.hf_tokenizer(model), source, prepend_bos)], device=model.cfg.device)
        source_ids, cache = source, None
    else:
        cache, source_ids = source, tokens
        tla.cache_model(cache)  # a cache taken in training mode is refused, not re-run
    if isinstance(target_prompt, str):
        check_prompts(target_prompt)
        target_ids = torch.tensor(prompt_ids(tla.hf_tokenizer(model), target_prompt, prepend_bos), device=model.cfg.device)
    else:
        target_ids = target_prompt.to(model.cfg.device)
    if cache is None:  # a given cache has run already; a source to run must fit, as must the target
        check_context(source_ids.shape[-1], context_length(model), what="the source prompt")
    check_context(target_ids.shape[0], context_length(model), max_new_tokens, what="the target prompt")
    with eval_mode(model), torch.no_grad():
        if cache is None:
            _, cache = model.run_with_cache(source_ids, names_filter=tla.hook_filter(model))
        _, every, read, (batch, seq) = tla.lens_rows(cache, False, False)
        if batch != 1:
            raise LensValueError(f"a Patchscope reads one source prompt; this cache holds a batch of {batch}")
        if source_ids is None:
            source_ids = tla.recover_tokens(cache)
        tla.check_tokens_match_embed(cache, source_ids)
        request = plan(
            every, seq, target_ids.shape[0], model.tokenizer, model.W_U.shape[1], layers=layers,
            positions=positions, target_layer=target_layer, target_position=target_position, targets=targets,
            token_sets=token_sets, reductions=reductions, top_k=top_k, batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )
        hidden = read(request.rows, list(request.lens.positions))[:, 0]
        runner = _Runner(model, request, target_ids.reshape(1, -1), vocab_chunk, token_chunk)
        return run(runner, request, hidden.float(), source_ids.to(torch.long).cpu(), target_ids.cpu(),
                   target_prompt if isinstance(target_prompt, str) else model.tokenizer.decode(target_ids.tolist()),
                   model.tokenizer, mapping, progress=progress)

def _cross_model(model, target_model, source, *, layers, positions, target_prompt, target_layer, target_position,
                 mapping, top_k, targets, token_sets, reductions, batch_size, max_new_tokens, chunks, prepend_bos):
    """``run_patchscope`` with ``target_model`` reading ``model``'s hidden states: the source rows come from
    ``model`` at the source positions paired with the target's (``methods.cross_model.text_pairs``), the
    reference from ``target_model`` run on the same text."""
    from lens_plugins.methods.cross_model import check_same_backend, text_pairs

    check_same_backend(model, target_model)
    if not isinstance(source, str):
        raise LensValueError("with target_model=, pass the source prompt as text: the two models' positions are paired "
                             "by character offsets")
    check_prompts(source)
    target_tokenizer = tla.hf_tokenizer(target_model)
    pairs = text_pairs(tla.hf_tokenizer(model), target_tokenizer, source, prepend_bos)
    if isinstance(target_prompt, str):
        check_prompts(target_prompt)
        target_ids = torch.tensor(prompt_ids(target_tokenizer, target_prompt, prepend_bos), device=target_model.cfg.device)
    else:
        target_ids = target_prompt.to(target_model.cfg.device)
    check_context(len(pairs.source_ids), context_length(model), what="the source prompt")
    check_context(len(pairs.target_ids), context_length(target_model), what="the source prompt (on the target model)")
    check_context(target_ids.shape[0], context_length(target_model), max_new_tokens, what="the target prompt")
    text_ids = torch.tensor([pairs.target_ids], device=target_model.cfg.device)
    with eval_mode(model), eval_mode(target_model), torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([pairs.source_ids], device=model.cfg.device),
                                        names_filter=tla.hook_filter(model))
        _, every, read, _ = tla.lens_rows(cache, False, False)
        _, target_cache = target_model.run_with_cache(text_ids, names_filter=tla.hook_filter(target_model))
        _, target_every, read_target, _ = tla.lens_rows(target_cache, False, False)
        request = plan(
            every, len(pairs.target_ids), target_ids.shape[0], target_model.tokenizer, target_model.W_U.shape[1],
            layers=layers, positions=pairs.target_index.tolist() if positions is None else positions,
            target_layer=target_layer, target_position=target_position, targets=targets, token_sets=token_sets,
            reductions=reductions, top_k=top_k, batch_size=batch_size, max_new_tokens=max_new_tokens,
            target_every=target_every,
        )
        chosen = list(request.lens.positions)
        hidden = read(request.rows, pairs.source_positions(chosen))[:, 0]
        reference = read_target([target_every[-1]], chosen)[0, 0]
        runner = _Runner(target_model, request, target_ids.reshape(1, -1), *chunks)
        return run(runner, request, hidden.float(), text_ids.cpu(), target_ids.cpu(),
                   target_prompt if isinstance(target_prompt, str) else target_model.tokenizer.decode(target_ids.tolist()),
                   target_model.tokenizer, mapping, reference=reference.float(), width=target_model.cfg.d_model)

__all__ = ["run_patchscope"]
