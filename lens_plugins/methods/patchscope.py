"""Patchscopes (Ghandeharioun et al., ICML 2024): let the model itself read a hidden state.

``lp.patchscope(model, "The Eiffel Tower is in")`` takes the source prompt's hidden state at every lens row
("embed", "1_pre", ..., "29_post") and each chosen position, writes it (through an optional mapping) into a
target prompt at row ``l*`` (default: the same row) and position ``i*`` (default: the last token, the
placeholder of the token-identity prompt), runs the target forward and reads the model's next-token
distribution at ``i*`` through the same streamed reductions as the logit lens. The result is a
``PatchscopeResult``, a ``LensResult`` whose rows are the source rows and whose columns are the source
positions, so ``top_tokens``, ``plot``, ``to_dataframe`` and the trajectories apply unchanged. Its "final"
reference (KL to the final row, ``final_top1``, ``top1_agreement``) is the model's own prediction at the
source position, whatever the target: ``top1_agreement()`` is the Patchscope's precision@1.

Pairs are batched: one target forward per ``batch_size`` (row, position) pairs, batch item ``b`` carrying
pair ``b``'s patch. The driver here is backend-free: ``plan`` validates a call against the row plan
(``core.rows``) and builds the lens request (``core.request.build``), the same on both backends; each backend
reads the source rows with its reader and supplies a runner for a patched target batch
(``adapters.patchscope_transformer_lens``, ``adapters.patchscope_nnsight``, exported as
``lp.transformer_lens.patchscope`` / ``lp.nnsight.patchscope``); the torch-only arithmetic and the in-trace
bodies are ``lens_plugins.core.patching``.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins import tokens as token_utils
from lens_plugins.core import patching
from lens_plugins.core import request as lens_request
from lens_plugins.core import rows as row_plan
from lens_plugins.core.errors import LensFloatingPointError, LensIndexError, LensTypeError, LensValueError
from lens_plugins.core.pipeline import check_finite
from lens_plugins.core.rows import Row
from lens_plugins.methods.lens import LensRequest, TokenSets, assemble
from lens_plugins.methods.result import LensResult
from lens_plugins.progress import bar as progress_bar
from lens_plugins.typecheck import typechecked

# The token-identity target prompt of the paper (Section 4.1): a few "x->x" demonstrations ending in a
# placeholder; the source hidden state replaces the placeholder's, and the model's continuation says what
# it encodes.
IDENTITY_PROMPT = "cat->cat; 1135->1135; hello->hello; ?"
# Reductions that compare a row with another row of the same lens: a Patchscope's rows are separate
# forward passes, so these have no meaning here.
UNSUPPORTED_REDUCTIONS = ("kl_input_row", "kl_next_row")

# One mapping for every source row, or ``{source row label: mapping}`` (a fitted cross-model map has one per
# (source row, target row), ``CrossModelMap.mappings``).
Mapping = Union[None, Callable[[Tensor], Tensor], tuple, dict]
RowSpec = Union[int, str]


@typechecked
@dataclass
class PatchscopeResult(LensResult):
    """A ``LensResult`` whose row ``l`` and position ``i`` hold what the target forward said at ``i*`` when
    given the source's hidden state from row ``l`` at position ``i``. The reference ("final") is the model's
    own prediction at the source position. ``target_labels[r]`` is where row ``r`` was written in the
    target; ``generated_ids`` the greedy continuation of the patched target, when asked for."""

    target_prompt: str = ""
    target_token_ids: Optional[Int[Tensor, "target_seq"]] = None
    target_position: int = -1
    target_labels: list[str] = field(default_factory=list)
    generated_ids: Optional[Int[Tensor, "row batch pos n_new"]] = None

    def generated(self, pos: int = -1, batch: int = 0) -> dict[str, str]:
        """Per row, the patched target's greedy continuation at source position ``pos``, as text."""
        if self.generated_ids is None:
            raise LensValueError("no tokens were generated: pass max_new_tokens=N to patchscope(...)")
        p = self.pos_index(pos)
        return {label: "".join(self.token(i) for i in self.generated_ids[r, batch, p].tolist())
                for r, label in enumerate(self.labels)}

    def to_dataframe(self):
        frame = super().to_dataframe()
        frame["target_row"] = [self.target_labels[self.labels.index(row)] for row in frame["row"]]
        if self.generated_ids is not None:
            frame["generated"] = [
                "".join(self.token(i) for i in self.generated_ids[self.labels.index(row), b, self.positions.index(pos)].tolist())
                for row, b, pos in zip(frame["row"], frame["batch"], frame["pos"])
            ]
        return frame


@dataclass(frozen=True)
class PatchRequest:
    """Everything about a Patchscope call known before the source or the target runs."""

    rows: list[Row]             # the source rows read (core.rows.select of the row plan; the last is the final row)
    target_labels: list[str]    # where each is written in the target
    lens: LensRequest           # positions, reductions, targets: as for the logit lens (core.request.build)
    readout: tuple[str, ...]    # the readout's reductions for that request
    target_position: int        # absolute index in the target prompt
    batch_size: int
    max_new_tokens: int

    @property
    def labels(self) -> list[str]:
        return [row.label for row in self.rows]


def plan(
    every: list[Row],
    seq_len: int,
    target_len: int,
    tokenizer,
    d_vocab: int,
    *,
    layers: Optional[Sequence[RowSpec]],
    positions: Optional[Union[int, Sequence[int]]],
    target_layer: Optional[RowSpec],
    target_position: int,
    targets: Sequence[token_utils.TargetSpec],
    token_sets: Optional[TokenSets],
    reductions: Sequence[str],
    top_k: int,
    batch_size: int,
    max_new_tokens: int,
    target_every: Optional[list[Row]] = None,
) -> PatchRequest:
    """Validate a Patchscope call against the model's row plan ``every`` (``core.rows.plan``) and the prompts'
    lengths, before any forward: the same checks, in the same order, on both backends (which check the
    prompts against the context first, with ``backends._common.check_context``). ``target_every`` is the
    target model's row plan when another model reads the source (``target_model=``): ``target_layer`` is one
    of its rows, and without it each source row is written at the target row of the same label."""
    bad = [r for r in reductions if r in UNSUPPORTED_REDUCTIONS]
    if bad:
        raise LensValueError(f"reductions {bad} compare a lens row with another row; a Patchscope's rows are separate "
                         f"forward passes, so they are not available here. Drop them from reductions=[...]")
    if batch_size < 1:
        raise LensValueError(f"batch_size must be at least 1 (pairs per target forward), got {batch_size}")
    if max_new_tokens < 0:
        raise LensValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    if not -target_len <= target_position < target_len:
        raise LensIndexError(f"target_position {target_position} is out of range for a target prompt of {target_len} tokens")
    rows = row_plan.select(every, layers)
    target_rows = every if target_every is None else target_every
    if target_layer is None:
        target_labels = [row.label for row in rows]
        missing = [label for label in target_labels if label not in {row.label for row in target_rows}]
        if missing:
            raise LensValueError(f"the target model has no rows {missing} (its last is {target_rows[-1].label!r}): "
                                 "pass target_layer= (an index or label of the target's rows)")
    else:  # the one row target_layer names (select keeps the last row too, after it)
        target_labels = [row_plan.select(target_rows, [target_layer])[0].label] * len(rows)
    for label in target_labels:
        patching.patch_row(label)
    request = LensRequest.from_dict(lens_request.build(tokenizer, d_vocab, seq_len, top_k, positions, targets,
                                                       token_sets, reductions))
    return PatchRequest(
        rows=rows, target_labels=target_labels, lens=request,
        readout=lens_request.readout_reductions(request.reductions, len(request.user_ids)),
        target_position=target_position % target_len, batch_size=batch_size, max_new_tokens=max_new_tokens,
    )


def map_hidden(hidden: Tensor, mapping: Mapping, width: Optional[int] = None) -> Tensor:
    """Apply the user's mapping to the source hidden states ``[pairs, d]``: ``None`` (identity), a callable
    (``torch.nn.Linear``, a lambda, ...) or an affine map ``(weight, bias)`` (``h @ weight.T + bias``, see
    ``core.patching.apply_mapping``). The result is ``[pairs, width]``: the target's width, by default the
    source's (the same model)."""
    width = hidden.shape[-1] if width is None else width
    if isinstance(mapping, dict):
        raise LensValueError("a mapping per source row ({label: mapping}) is applied by map_pairs, with the pairs' rows")
    if mapping is None:
        mapped = hidden.float()
    elif isinstance(mapping, tuple):
        if len(mapping) != 2:
            raise LensValueError("an affine mapping is a pair (weight [d, d] or None, bias [d] or None)")
        mapped = patching.apply_mapping(hidden, *mapping)
    elif callable(mapping):
        with torch.no_grad():
            mapped = mapping(hidden.float())
    else:
        raise LensTypeError(f"mapping must be None, a callable or a (weight, bias) pair, not {type(mapping).__name__}")
    expected = (hidden.shape[0], width)
    if not isinstance(mapped, Tensor) or tuple(mapped.shape) != expected:
        got = tuple(mapped.shape) if isinstance(mapped, Tensor) else type(mapped).__name__
        need = ("the target is written at the same width, so the mapping must keep the shape"
                if width == hidden.shape[-1] else f"the target model is {width} wide, so the mapping must return {expected}")
        raise LensValueError(f"the mapping turned hidden states of shape {tuple(hidden.shape)} into {got}: {need}")
    return mapped


def map_pairs(hidden: Tensor, labels: list[str], mapping: Mapping, width: Optional[int] = None) -> Tensor:
    """``map_hidden`` for pairs ``[k, d]`` whose source rows are ``labels``: a dict mapping applies each row's
    own entry (every row of the call needs one), any other mapping applies to all."""
    if not isinstance(mapping, dict):
        return map_hidden(hidden, mapping, width)
    missing = sorted(set(labels) - set(mapping), key=labels.index)
    if missing:
        raise LensValueError(f"mapping has no entry for source rows {missing}: a dict mapping needs one per source row "
                             f"of the call ({sorted(mapping)} given)")
    out = torch.empty(hidden.shape[0], hidden.shape[-1] if width is None else width)
    for label in dict.fromkeys(labels):
        index = torch.tensor([i for i, own in enumerate(labels) if own == label])
        out[index] = map_hidden(hidden[index], mapping[label], width).to(out.device)
    return out


def mapping_name(mapping: Mapping) -> str:
    """How an error names ``mapping``: the affine pair, a function's name, or a module's class."""
    if mapping is None:
        return "the identity"
    if isinstance(mapping, dict):
        return "the per-row dict"
    if isinstance(mapping, tuple):
        return "the affine (weight, bias) pair"
    return getattr(mapping, "__name__", None) or type(mapping).__name__


def check_mapped(mapped: Tensor, mapping: Mapping, labels: list[str], positions: list[int]) -> None:
    """Refuse mapped hidden states ``[pairs, d]`` holding NaN or inf, naming the mapping and the first pair's
    source row and position: the source states were finite (``run`` checks them), so the mapping made them,
    and the target forward would turn them into NaN everywhere after the write."""
    bad = ~torch.isfinite(mapped).all(-1)
    if bad.any():
        pair = int(bad.nonzero()[0])
        kind = "NaN" if bool(torch.isnan(mapped[pair]).any()) else "inf"
        raise LensFloatingPointError(
            f"mapping={mapping_name(mapping)} turned the finite hidden state of row {labels[pair]!r} at source position "
            f"{positions[pair]} into {kind} ({int(bad.sum())} non-finite of {len(labels)} mapped in that batch): "
            "fix the mapping (its weights, or an overflow in it) so that it maps finite states to finite ones")


class TargetRunner:
    """What a backend supplies: run one batch of patched target forwards.

    ``read(values [k, d], target_labels, reference [k, d], target_ids [k, C], read_next_token)`` returns the
    readout's ``[2, k, ...]`` statistics (``lens_statistics`` of ``core.patching.readout_stack``) and, if asked,
    the argmax at the target's last position ``[k]``; ``next_tokens(tokens [k, seq], values, target_labels)``
    runs the patched target on ``tokens`` and returns the argmax at the last position.
    """

    def read(self, values, target_labels, reference, target_ids, read_next_token):  # pragma: no cover - interface
        raise NotImplementedError

    def next_tokens(self, tokens, values, target_labels):  # pragma: no cover - interface
        raise NotImplementedError


@typechecked
def run(
    runner: TargetRunner,
    request: PatchRequest,
    hidden: Float[Tensor, "row pos d_model"],
    source_ids: Int[Tensor, "1 seq"],
    target_ids: Int[Tensor, "target_seq"],
    target_prompt: str,
    tokenizer,
    mapping: Mapping = None,
    progress: bool = False,
    reference: Optional[Float[Tensor, "pos d_target"]] = None,
    width: Optional[int] = None,
) -> PatchscopeResult:
    """Run the Patchscope of source ``hidden`` (the request's rows at its positions) through ``runner``, one
    target forward per batch of pairs, and label the result. The last row is the final residual (the row
    selection always keeps it): the reference each pair's read-out is compared with. Non-finite source states
    are refused before any target runs, and mapped ones (``check_mapped``) before they are written. ``progress``:
    a bar over the (row, position) pairs (``lens_plugins.progress``). When another model reads the source
    (``target_model=``), ``reference`` is that model's own final residual at the positions (the prediction
    precision@1 is measured against) and ``width`` its ``d_model``."""
    n_rows, n_pos, _ = hidden.shape
    reference = hidden[-1] if reference is None else reference
    # [positions, C]: next token, input token, targets, set members (one source prompt)
    columns = lens_request.target_columns(source_ids, torch.ones_like(source_ids), request.lens.positions,
                                          request.lens.reductions, request.lens.user_ids)
    chunks, generated = [], []
    want_tokens = request.max_new_tokens > 0
    check_finite(hidden[:, None], request.labels, request.lens.positions)
    with progress_bar(progress, n_rows * n_pos, "patchscope", "pair") as shown:
        for rows, positions in patching.pair_batches(n_rows, n_pos, request.batch_size):
            values = map_pairs(hidden[rows, positions], [request.labels[r] for r in rows.tolist()], mapping,
                               width)
            check_mapped(values, mapping, [request.labels[r] for r in rows.tolist()],
                         [request.lens.positions[p] for p in positions.tolist()])
            labels = [request.target_labels[r] for r in rows.tolist()]
            stats, first = runner.read(values, labels, reference[positions], columns[positions], want_tokens)
            chunks.append((rows, positions, patching.patched_statistics(stats)))
            if want_tokens:
                generated.append(_generate(runner, target_ids, values, labels, first, request.max_new_tokens))
            shown.update(len(rows))
    stats = patching.scatter_pairs(chunks, n_rows, n_pos)
    lens = assemble(stats, request.lens, request.labels, source_ids.cpu(), tokenizer)
    generated_ids = None
    if want_tokens:
        generated_ids = torch.cat(generated).reshape(n_rows, 1, n_pos, request.max_new_tokens)
        lens.vocab_strings.update(token_utils.token_strings(tokenizer, generated_ids.reshape(-1)))
    return PatchscopeResult(
        **{f: getattr(lens, f) for f in LensResult.__dataclass_fields__},
        target_prompt=target_prompt, target_token_ids=target_ids.cpu(), target_position=request.target_position,
        target_labels=request.target_labels, generated_ids=generated_ids,
    )


def _generate(runner: TargetRunner, target_ids: Tensor, values: Tensor, labels: list[str], first: Tensor,
              max_new_tokens: int) -> Tensor:
    """Greedy continuation ``[k, max_new_tokens]`` of the patched target. Re-running the whole sequence with
    the same patch at each step equals patching once and decoding with a key-value cache: positions before
    ``i*`` are unchanged and every later one sees the patched state."""
    k = values.shape[0]
    tokens = torch.cat([target_ids.cpu().expand(k, -1), first.cpu().reshape(k, 1)], dim=1)
    for _ in range(max_new_tokens - 1):
        tokens = torch.cat([tokens, runner.next_tokens(tokens, values, labels).cpu().reshape(k, 1)], dim=1)
    return tokens[:, target_ids.shape[0]:]


@typechecked
def patchscope(model, source, **kwargs) -> PatchscopeResult:
    """The Patchscope of ``source`` (a prompt; on TransformerLens also an ``ActivationCache``) on ``model``, a
    TransformerLens model or an nnsight model: ``lp.transformer_lens.patchscope`` or ``lp.nnsight.patchscope``,
    which take the same options (``layers``, ``positions``, ``target_prompt``, ``target_layer``,
    ``target_position``, ``mapping``, ``top_k``, ``targets``, ``token_sets``, ``reductions``, ``batch_size``,
    ``max_new_tokens``, ``progress``, ``target_model``; nnsight adds ``remote``, ``backend`` and ``paths``).
    ``target_model=`` lets another model of the same backend read the source's hidden states
    (``methods.cross_model``)."""
    from lens_plugins import backends  # the backends build on this module: imported when a call dispatches

    return backends.of(model).run_patchscope(model, source, **kwargs)

__all__ = ["IDENTITY_PROMPT", "UNSUPPORTED_REDUCTIONS", "Mapping", "RowSpec", "PatchscopeResult", "PatchRequest",
    "plan", "map_hidden", "map_pairs", "mapping_name", "check_mapped", "TargetRunner", "run", "patchscope"]
