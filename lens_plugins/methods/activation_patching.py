"""Activation patching read through the lens: ``lp.patching(model, source, target, answer=..., foil=...)``.

For every chosen residual cell (a row of the lens's row plan, ``core.rows``, and a position), the target prompt
runs with that cell overwritten by the source prompt's value there, and the metric is read from the output at
``metric_position``: the logit difference ``answer - foil``, the probability of ``answer`` or its rank. With
``lens=`` (or ``cone=True``: the logit lens) the same metric is also read through the lens at every cell of the
patched forward, the "affected cone": how each later row and position's lens prediction moved. Over a prompt
set (lists of source and target prompts, one answer per pair) ``PatchingResult.interval`` gives seeded
bootstrap confidence intervals of the mean effect.

The driver here is backend-free (``plan`` validates a call before any forward, ``run`` batches the cells and
labels the result); each backend supplies a ``Runner`` that runs one batch ``[source, target, target x k]``
and returns the reductions of ``core.activation_patching.measure`` (TransformerLens with hooks,
``backends/transformer_lens/activation_patching.py``; nnsight in one trace per batch,
``core/trace/activation_patching.py``, which is all a remote request runs and all it downloads).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins import tokens as token_utils
from lens_plugins.core import activation_patching as core
from lens_plugins.core import request as lens_request
from lens_plugins.core import rows as row_plan
from lens_plugins.core.errors import LensIndexError, LensTypeError, LensValueError
from lens_plugins.core.rows import Row
from lens_plugins.typecheck import typechecked

RowSpec = Union[int, str]
Answers = Union[token_utils.TargetSpec, Sequence[token_utils.TargetSpec]]


@typechecked
@dataclass
class Interval:
    """A bootstrap confidence interval of the mean over prompts, per cell: ``mean``, ``low``, ``high``
    (percentiles of ``n_resamples`` resampled means, drawn with ``seed``)."""

    mean: Float[Tensor, "..."]
    low: Float[Tensor, "..."]
    high: Float[Tensor, "..."]
    confidence: float
    n_resamples: int
    seed: int


@typechecked
def bootstrap(values: Float[Tensor, "prompt ..."], confidence: float = 0.95, n_resamples: int = 1000,
              seed: int = 0) -> Interval:
    """Percentile bootstrap of the mean over the first axis: ``n_resamples`` resamples of the prompts with
    replacement (a ``torch.Generator`` seeded with ``seed``, so the same call gives the same interval), the mean of
    each, and their ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles (linear interpolation, as
    ``numpy.percentile``)."""
    if not 0 < confidence < 1:
        raise LensValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    if n_resamples < 1:
        raise LensValueError(f"n_resamples must be at least 1, got {n_resamples}")
    n = values.shape[0]
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(n, (n_resamples, n), generator=generator)
    means = values.float()[index].mean(1)
    tails = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2])
    low, high = torch.quantile(means, tails, dim=0)
    return Interval(values.float().mean(0), low, high, confidence, n_resamples, seed)


@typechecked
@dataclass
class PatchingResult:
    """A patching sweep over ``prompt`` pairs: ``values[p, r, i]`` is the metric of target ``p`` with row
    ``labels[r]`` at position ``positions[i]`` patched from source ``p``; ``source_values`` / ``target_values``
    the unpatched runs' metric (from the same forward passes). With a cone, ``cone[p, r, i, r', t]`` is the
    metric read through the lens at row ``read_labels[r']`` and position ``t`` of that patched run, and
    ``source_cone`` / ``target_cone`` the same of the unpatched runs."""

    metric: str
    labels: list[str]
    positions: list[int]
    metric_position: int
    values: Float[Tensor, "prompt row pos"]
    source_values: Float[Tensor, "prompt"]
    target_values: Float[Tensor, "prompt"]
    source_ids: Int[Tensor, "prompt seq"]
    target_ids: Int[Tensor, "prompt seq"]
    answer_ids: list[int]
    foil_ids: list[Optional[int]]
    vocab_strings: dict[int, str]
    read_labels: list[str]
    lens_name: str = ""
    cone: Optional[Float[Tensor, "prompt row pos read_row seq"]] = None
    source_cone: Optional[Float[Tensor, "prompt read_row seq"]] = None
    target_cone: Optional[Float[Tensor, "prompt read_row seq"]] = None

    @property
    def n_prompts(self) -> int:
        return self.values.shape[0]

    def target_tokens(self, prompt: int = 0) -> list[str]:
        """The target prompt's tokens as strings (axis labels)."""
        return [self.vocab_strings[i] for i in self.target_ids[prompt].tolist()]

    def normalized(self) -> Float[Tensor, "prompt row pos"]:
        """``(patched - target) / (source - target)`` per prompt: 0 where the patch did nothing, 1 where it
        restored the source's metric (NaN for a prompt whose source and target metrics are equal)."""
        gap = (self.source_values - self.target_values)[:, None, None]
        return (self.values - self.target_values[:, None, None]) / gap

    def mean(self, normalized: bool = False) -> Float[Tensor, "row pos"]:
        """The mean over prompts of ``values`` (or of ``normalized()``)."""
        return (self.normalized() if normalized else self.values).mean(0)

    def interval(self, confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0,
                 normalized: bool = False) -> Interval:
        """Bootstrap confidence interval of the mean over prompts per cell (``bootstrap``)."""
        return bootstrap(self.normalized() if normalized else self.values, confidence, n_resamples, seed)

    def _cell(self, row: RowSpec, pos: int) -> tuple[int, int]:
        r = row if isinstance(row, int) else self.labels.index(row) if row in self.labels else None
        if r is None or not -len(self.labels) <= r < len(self.labels):
            raise LensIndexError(f"row {row!r} was not patched; the patched rows are {self.labels}")
        absolute = pos % self.target_ids.shape[1] if -self.target_ids.shape[1] <= pos < self.target_ids.shape[1] else None
        if absolute not in self.positions:
            raise LensIndexError(f"position {pos} was not patched; the patched positions are {self.positions}")
        return r % len(self.labels), self.positions.index(absolute)

    def cone_change(self, row: RowSpec, pos: int) -> Float[Tensor, "read_row seq"]:
        """Mean over prompts of how the lens's metric moved at every cell when cell ``(row, pos)`` was patched:
        ``cone - target_cone``. Zero, exactly, before the patched row and position (nothing there can see it)."""
        if self.cone is None:
            raise LensValueError("this sweep has no cone: pass lens=... (or cone=True for the logit lens) to patching()")
        r, i = self._cell(row, pos)
        return (self.cone[:, r, i] - self.target_cone).mean(0)

    def to_dataframe(self):
        """One row per prompt and patched cell: ``prompt``, ``row``, ``pos``, ``token``, ``value``, ``source``,
        ``target``, ``normalized``."""
        import pandas as pd

        normalized = self.normalized()
        records = []
        for p in range(self.n_prompts):
            tokens = self.target_tokens(p)
            for r, label in enumerate(self.labels):
                for i, pos in enumerate(self.positions):
                    records.append({"prompt": p, "row": label, "pos": pos, "token": tokens[pos],
                                    "value": float(self.values[p, r, i]), "source": float(self.source_values[p]),
                                    "target": float(self.target_values[p]),
                                    "normalized": float(normalized[p, r, i])})
        return pd.DataFrame.from_records(records)

    def plot(self, normalized: bool = True, **kwargs):
        """The sweep's heatmap (``plot.activation_patching.patching_figure``)."""
        from lens_plugins.plot.activation_patching import patching_figure

        return patching_figure(self, normalized=normalized, **kwargs)

    def plot_cone(self, row: RowSpec, pos: int, **kwargs):
        """The affected cone of one patched cell (``plot.activation_patching.cone_figure``)."""
        from lens_plugins.plot.activation_patching import cone_figure

        return cone_figure(self, row, pos, **kwargs)


@dataclass(frozen=True)
class PatchingRequest:
    """Everything about a sweep known before any forward runs, the same on both backends."""

    rows: list[Row]             # the patched rows (core.rows.select of the row plan)
    positions: list[int]        # patched positions (absolute)
    metric: str
    metric_position: int        # absolute
    answer_ids: list[int]       # one per prompt pair
    foil_ids: list[Optional[int]]
    read_rows: list[Row]        # the cone's rows (every row of the plan), or [] for no cone
    batch_size: int

    @property
    def labels(self) -> list[str]:
        return [row.label for row in self.rows]

    @property
    def read_labels(self) -> list[str]:
        return [row.label for row in self.read_rows]


def _per_pair(spec, n_pairs: int, name: str) -> list:
    """One answer (or foil) per prompt pair: a single token for all, or a list of ``n_pairs``."""
    if isinstance(spec, (str, int)) or spec is None:
        return [spec] * n_pairs
    spec = list(spec)
    if len(spec) != n_pairs:
        raise LensValueError(f"{name}= gives {len(spec)} tokens for {n_pairs} prompt pairs: give one token for all, "
                             "or one per pair")
    return spec


def _one_token(tokenizer, spec, d_vocab: int, name: str) -> int:
    """The id of one answer or foil token (a string that is one token, or an id), refused by name otherwise."""
    if not isinstance(spec, (str, int)) or isinstance(spec, bool):
        raise LensTypeError(f"{name}= takes one token per prompt pair (a string or an id), got {spec!r}")
    return lens_request.token_set_ids(tokenizer, spec, d_vocab, name)[0]


def pair_ids(source_ids: list[list[int]], target_ids: list[list[int]]) -> tuple[Tensor, Tensor]:
    """``(source [prompt, seq], target [prompt, seq])``, refusing pairs of different lengths: a cell is one row
    and one position of both prompts, so they must align token for token."""
    if len(source_ids) != len(target_ids):
        raise LensValueError(f"{len(source_ids)} source prompts but {len(target_ids)} target prompts: give one source "
                             "per target")
    lengths = {len(ids) for ids in source_ids + target_ids}
    if len(lengths) != 1:
        bad = next(i for i, (s, t) in enumerate(zip(source_ids, target_ids)) if len(s) != len(t) or
                   len(s) != len(source_ids[0]))
        raise LensValueError(
            f"activation patching aligns source and target token for token, but pair {bad} has a {len(source_ids[bad])}-"
            f"token source and a {len(target_ids[bad])}-token target (all prompts must have {len(source_ids[0])} "
            "tokens, the first source's length): reword the prompts so that they tokenize to the same length")
    return torch.tensor(source_ids), torch.tensor(target_ids)


def plan(every: list[Row], seq_len: int, n_pairs: int, tokenizer, d_vocab: int, *,
         layers: Optional[Sequence[RowSpec]], positions: Optional[Union[int, Sequence[int]]], metric: str,
         answer: Answers, foil: Optional[Answers], metric_position: int, cone: bool,
         batch_size: int) -> PatchingRequest:
    """Validate a sweep against the row plan ``every`` and the prompts' length before any forward: the same
    checks, in the same order, on both backends."""
    core.check_metric(metric, foil is not None)
    if batch_size < 1:
        raise LensValueError(f"batch_size must be at least 1 (patched cells per forward), got {batch_size}")
    if not -seq_len <= metric_position < seq_len:
        raise LensIndexError(f"metric_position {metric_position} is out of range for prompts of {seq_len} tokens")
    rows = row_plan.select(every, layers)
    for row in rows:
        core.patch_row(row)
    chosen = lens_request.resolve_positions(positions, seq_len)
    answers = [_one_token(tokenizer, a, d_vocab, "answer") for a in _per_pair(answer, n_pairs, "answer")]
    foils = [None if f is None else _one_token(tokenizer, f, d_vocab, "foil") for f in _per_pair(foil, n_pairs, "foil")]
    return PatchingRequest(rows=rows, positions=chosen, metric=metric, metric_position=metric_position % seq_len,
                           answer_ids=answers, foil_ids=foils, read_rows=list(every) if cone else [],
                           batch_size=batch_size)


class Runner:
    """What a backend supplies: ``measure(tokens [2 + k, seq], cell_labels, cell_positions, answer_id, foil_id)``
    runs one forward over ``[source, target, target x k]`` (``core.activation_patching.batch_tokens``) with
    item ``2 + j`` patched at ``(cell_labels[j], cell_positions[j])`` and returns
    ``core.activation_patching.measure``'s ``{"metric": [2 + k], "cone": [2 + k, read_rows, seq]}``."""

    def measure(self, tokens, cell_labels, cell_positions, answer_id, foil_id):  # pragma: no cover - interface
        raise NotImplementedError


def _cells(request: PatchingRequest) -> list[tuple[int, int]]:
    """The (row index, position index) cells, row-major."""
    return [(r, i) for r in range(len(request.rows)) for i in range(len(request.positions))]


@typechecked
def run(runner: Runner, request: PatchingRequest, source_ids: Int[Tensor, "prompt seq"],
        target_ids: Int[Tensor, "prompt seq"], tokenizer, lens_name: str = "") -> PatchingResult:
    """Run the sweep through ``runner``: per prompt pair, one forward per ``batch_size`` cells. The last batch is
    padded with copies of its last cell, so that every forward of a pair has the same shape and its source and
    target items are bit-identical across batches (the invariants a test holds are exact, not to rounding)."""
    cells = _cells(request)
    k = min(request.batch_size, len(cells))
    n_pairs, seq = target_ids.shape
    values = torch.zeros(n_pairs, len(request.rows), len(request.positions))
    source_values, target_values = torch.zeros(n_pairs), torch.zeros(n_pairs)
    n_read = len(request.read_rows)
    cone = torch.zeros(n_pairs, len(request.rows), len(request.positions), n_read, seq) if n_read else None
    source_cone = torch.zeros(n_pairs, n_read, seq) if n_read else None
    target_cone = torch.zeros(n_pairs, n_read, seq) if n_read else None
    for p in range(n_pairs):
        tokens = core.batch_tokens(source_ids[p], target_ids[p], k)
        for start in range(0, len(cells), k):
            batch = cells[start:start + k]
            padded = batch + [batch[-1]] * (k - len(batch))
            labels = [request.labels[r] for r, _ in padded]
            positions = [request.positions[i] for _, i in padded]
            out = runner.measure(tokens, labels, positions, request.answer_ids[p], request.foil_ids[p])
            metric = out["metric"].float().cpu()
            for j, (r, i) in enumerate(batch):
                values[p, r, i] = metric[core.FIRST_PATCHED + j]
                if cone is not None:
                    cone[p, r, i] = out["cone"][core.FIRST_PATCHED + j].float().cpu()
            if start == 0:
                source_values[p], target_values[p] = metric[core.SOURCE], metric[core.TARGET]
                if cone is not None:
                    source_cone[p] = out["cone"][core.SOURCE].float().cpu()
                    target_cone[p] = out["cone"][core.TARGET].float().cpu()
    ids = torch.cat([source_ids.reshape(-1), target_ids.reshape(-1), torch.tensor(request.answer_ids),
                     torch.tensor([f for f in request.foil_ids if f is not None], dtype=torch.long)])
    return PatchingResult(
        metric=request.metric, labels=request.labels, positions=list(request.positions),
        metric_position=request.metric_position, values=values, source_values=source_values,
        target_values=target_values, source_ids=source_ids.cpu(), target_ids=target_ids.cpu(),
        answer_ids=list(request.answer_ids), foil_ids=list(request.foil_ids),
        vocab_strings=token_utils.token_strings(tokenizer, ids), read_labels=request.read_labels,
        lens_name=lens_name, cone=cone, source_cone=source_cone, target_cone=target_cone,
    )


def lens_name(lens, cone: bool) -> str:
    """How figures name the lens the cone was read through."""
    if not cone:
        return ""
    return "logit lens" if lens is None else type(lens).__name__


@typechecked
def patching(model, source, target, **kwargs) -> PatchingResult:
    """The activation-patching sweep of ``source`` into ``target`` on ``model``, a TransformerLens model or an
    nnsight model: ``lp.transformer_lens.run_patching`` or ``lp.nnsight.run_patching``, which take the same
    options (``answer``, ``foil``, ``metric``, ``layers``, ``resid_mid``, ``positions``, ``metric_position``,
    ``lens``, ``cone``, ``batch_size``; nnsight adds ``remote``, ``backend`` and ``paths``)."""
    from lens_plugins import (
        backends,  # the backends build on this module: imported when a call dispatches
    )

    return backends.of(model).run_patching(model, source, target, **kwargs)

__all__ = ["RowSpec", "Answers", "Interval", "bootstrap", "PatchingResult", "PatchingRequest", "pair_ids", "plan",
           "Runner", "run", "lens_name", "patching"]
