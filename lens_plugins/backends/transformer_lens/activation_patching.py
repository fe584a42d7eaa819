"""Activation patching on TransformerLens models: ``lp.transformer_lens.run_patching``.

One ``run_with_hooks`` per batch ``[source, target, target x k]``: at each patched row's hook (``hook_name``:
"embed" and "3_pre" are ``blocks.L.hook_resid_pre``, "3_mid" ``hook_resid_mid``, "29_post" ``hook_resid_post``)
a hook copies the source item's value into the items patched there (``core.activation_patching.copy_cells``),
and hooks after it capture the final residual and the cone's rows; ``core.activation_patching.measure``
reduces them, as the nnsight trace body does.
"""

from collections.abc import Sequence
from typing import Optional, Union

import torch

from lens_plugins.backends._common import (
    check_context,
    check_prompts,
    context_length,
    eval_mode,
    one_at_a_time,
    prompt_ids,
)
from lens_plugins.backends.transformer_lens import reader as tla
from lens_plugins.backends.transformer_lens.verification import decoder_for
from lens_plugins.core import activation_patching as core
from lens_plugins.core.pipeline import check_decoder
from lens_plugins.core.rows import Row
from lens_plugins.core.rows import plan as row_plan
from lens_plugins.methods.activation_patching import (
    Answers,
    PatchingResult,
    RowSpec,
    Runner,
    lens_name,
    pair_ids,
    plan,
    run,
)
from lens_plugins.typecheck import typechecked


class _Runner(Runner):
    def __init__(self, model, request, lens, vocab_chunk, token_chunk):
        self.model, self.request, self.lens = model, request, lens
        self.decoder = decoder_for(model)
        check_decoder(self.decoder)
        self.final = Row(model.cfg.n_layers - 1, "post").label
        self.chunks = (vocab_chunk, token_chunk)

    def measure(self, tokens, cell_labels, cell_positions, answer_id, foil_id):
        reads, hooks = {}, []

        def writer(items, positions):
            return lambda act, hook: core.copy_cells(act, items, positions)

        def capture(label):
            def keep(act, hook):
                reads[label] = act.detach().float().clone()
            return keep

        for label, writes, wanted in core.events(cell_labels, self.request.read_labels + [self.final]):
            name = tla.hook_name(core.patch_row(label))
            if writes:
                items = core.items_at(cell_labels, label)
                hooks.append((name, writer(items, [cell_positions[i - core.FIRST_PATCHED] for i in items])))
            if wanted:
                hooks.append((name, capture(label)))
        self.model.run_with_hooks(tokens.to(self.model.cfg.device), fwd_hooks=hooks)
        labels = self.request.read_labels
        stack = torch.stack([reads[label] for label in labels]) if labels else None
        return core.measure(reads[self.final][:, self.request.metric_position], stack, self.request.read_rows,
                            self.lens, self.decoder, self.request.metric, answer_id, foil_id, *self.chunks)


@one_at_a_time
@typechecked
def run_patching(
    model,
    source: Union[str, Sequence[str]],
    target: Union[str, Sequence[str]],
    *,
    answer: Answers,
    foil: Optional[Answers] = None,
    metric: str = "logit_diff",
    layers: Optional[Sequence[RowSpec]] = None,
    resid_mid: bool = False,
    positions: Optional[Union[int, Sequence[int]]] = None,
    metric_position: int = -1,
    lens=None,
    cone: Optional[bool] = None,
    batch_size: int = 16,
    vocab_chunk: Optional[int] = None,
    token_chunk: Optional[int] = None,
    prepend_bos: Optional[bool] = None,
) -> PatchingResult:
    """Patch ``source`` into ``target`` at every chosen residual cell of a TransformerLens ``model``.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer``.
        source: the prompt whose activations are copied (or a list: a prompt set, one source per target).
        target: the prompt that runs patched (or a list); each pair must tokenize to the same length.
        answer: the token the metric scores (one for all pairs, or one per pair).
        foil: the token ``logit_diff`` subtracts (one, or one per pair).
        metric: ``"logit_diff"`` (``answer - foil``), ``"prob"`` (P(answer)) or ``"rank"`` (1 = top).
        layers: the rows patched, by index or label (default every row of the plan; the last is always kept).
        resid_mid: add each block's mid-residual row ("3_mid") to the plan.
        positions: the positions patched (default all).
        metric_position: where the metric is read (default the last token).
        lens: read the metric through this lens at every cell of each patched run (the cone).
        cone: the cone through the logit lens when no ``lens`` is given (default: only with ``lens``).
        batch_size: patched cells per forward pass.
        vocab_chunk: vocabulary columns per tile (``prob`` / ``rank``).
        token_chunk: vectors per tile.
        prepend_bos: as ``run_logit_lens``.

    Returns:
        A ``PatchingResult``: ``values [prompt, row, pos]``, the unpatched metrics, the cone, ``interval()``.

    Raises:
        LensValueError: prompts of different lengths, a bad metric, row, position or token.
    """
    sources, targets = check_prompts(source), check_prompts(target)
    tokenizer = tla.hf_tokenizer(model)
    source_ids, target_ids = pair_ids([prompt_ids(tokenizer, s, prepend_bos) for s in sources],
                                      [prompt_ids(tokenizer, t, prepend_bos) for t in targets])
    check_context(source_ids.shape[1], context_length(model), what="the prompts")
    use_cone = lens is not None if cone is None else cone
    every = row_plan(model.cfg.n_layers, resid_mid, False, tla.is_parallel(model))
    request = plan(every, source_ids.shape[1], len(sources), model.tokenizer, model.W_U.shape[1], layers=layers,
                   positions=positions, metric=metric, answer=answer, foil=foil, metric_position=metric_position,
                   cone=use_cone, batch_size=batch_size)
    with eval_mode(model), torch.no_grad():
        runner = _Runner(model, request, lens, vocab_chunk, token_chunk)
        return run(runner, request, source_ids, target_ids, model.tokenizer, lens_name(lens, use_cone))

__all__ = ["run_patching"]
