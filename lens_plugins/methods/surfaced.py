"""Surfaced, then overridden: did a target token ever lead at an intermediate row, and what took its place?

The standard first question about a wrong answer is whether the right one surfaced somewhere in the stack
and was overridden by later layers, or never surfaced at all. ``surfaced(result, targets)`` answers it
from a ``LensResult`` alone (no model, any backend, any ``lens=``): per prompt and decoded position, the
first row where the target is top-1 and where it is in the top-k, the row where its probability peaks, the
row after which it stopped being top-1 for good, and the token that was top-1 there (the overrider).

Everything is read from the target's exact ranks (``target_ranks``: ``1 + #`` strictly larger logits over
the whole vocabulary), so "in the top-k" holds for any ``k``, not only for the ``top_k`` the lens kept;
only the overrider's identity comes from ``top_ids``. Ties share rank 1, so at a tie the target counts as
top-1. Row indices are indices into ``labels``; -1 means "no such row".
"""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_plugins.core.errors import LensValueError
from lens_plugins.methods.result import LensResult
from lens_plugins.tokens import visible_text
from lens_plugins.typecheck import typechecked

# Outcome codes, in the order a summary lists them. ``unscored``: padding, or the last position when the
# target is the next token. ``never``: never in the top-k at any row. ``top_k``: in the top-k at some row,
# never top-1, not the final top-1. ``overridden``: top-1 at some row but not at the final row. ``kept``:
# the final row's top-1 (whatever happened before).
OUTCOMES = ("unscored", "never", "top_k", "overridden", "kept")
UNSCORED, NEVER, TOP_K, OVERRIDDEN, KEPT = range(len(OUTCOMES))

BatchPosInt = Int[Tensor, "batch pos"]


@typechecked
@dataclass
class SurfacedResult:
    """Per prompt (``batch``) and decoded position (``pos``): where the target surfaced, peaked and was lost.

    ``first_top1`` / ``first_top_k``: first row where the target ranks 1 / at most ``k``. ``peak_row``: the
    row of its highest probability (``peak_prob``; the first such row). ``best_rank`` and ``best_rank_row``:
    its best rank and the first row reaching it. ``last_top1``: the last row where it ranks 1. ``lost_row``:
    for an overridden target, the row after ``last_top1`` (it is never top-1 again from there), and
    ``overrider_id`` the top-1 at that row; ``lost_top_k_row`` likewise for a target that was in the top-k
    and is not at the final row. ``final_rank``, ``final_prob`` and ``final_top1_id`` are the final row's.
    Every row field is -1 where there is no such row or the position is unscored.
    """

    labels: list[str]
    positions: list[int]
    k: int
    target: str
    token_ids: Int[Tensor, "batch seq"]
    vocab_strings: dict[int, str]
    target_ids: BatchPosInt
    outcome: BatchPosInt
    first_top1: BatchPosInt
    first_top_k: BatchPosInt
    peak_row: BatchPosInt
    peak_prob: Float[Tensor, "batch pos"]
    best_rank: BatchPosInt
    best_rank_row: BatchPosInt
    last_top1: BatchPosInt
    lost_row: BatchPosInt
    lost_top_k_row: BatchPosInt
    overrider_id: BatchPosInt
    final_rank: BatchPosInt
    final_prob: Float[Tensor, "batch pos"]
    final_top1_id: BatchPosInt

    def token(self, token_id: int) -> str:
        return self.vocab_strings.get(int(token_id), f"<{int(token_id)}>")

    @property
    def scored(self) -> Bool[Tensor, "batch pos"]:
        return self.outcome != UNSCORED

    def label(self, row: int) -> str | None:
        """The row label of a row index, ``None`` for -1."""
        return None if row < 0 else self.labels[row]

    def to_dataframe(self):
        """One line per scored (prompt, position): the target, the outcome, every row as its label (``None``
        where there is no such row) and the overriding and final tokens."""
        import pandas as pd

        records = []
        for b, p in self.scored.nonzero().tolist():
            overrider = int(self.overrider_id[b, p])
            records.append({
                "batch": b, "pos": self.positions[p], "input_token": self.token(self.token_ids[b, self.positions[p]]),
                "target": self.token(self.target_ids[b, p]), "outcome": OUTCOMES[int(self.outcome[b, p])],
                "first_top1": self.label(int(self.first_top1[b, p])),
                "first_top_k": self.label(int(self.first_top_k[b, p])),
                "peak_row": self.label(int(self.peak_row[b, p])), "peak_prob": float(self.peak_prob[b, p]),
                "best_rank": int(self.best_rank[b, p]), "best_rank_row": self.label(int(self.best_rank_row[b, p])),
                "last_top1": self.label(int(self.last_top1[b, p])), "lost_row": self.label(int(self.lost_row[b, p])),
                "lost_top_k_row": self.label(int(self.lost_top_k_row[b, p])),
                "overrider": None if overrider < 0 else self.token(overrider),
                "final_rank": int(self.final_rank[b, p]), "final_prob": float(self.final_prob[b, p]),
                "final_top1": self.token(self.final_top1_id[b, p]),
            })
        columns = ["batch", "pos", "input_token", "target", "outcome", "first_top1", "first_top_k", "peak_row",
                   "peak_prob", "best_rank", "best_rank_row", "last_top1", "lost_row", "lost_top_k_row",
                   "overrider", "final_rank", "final_prob", "final_top1"]
        return pd.DataFrame.from_records(records, columns=columns)

    def summary(self):
        """Counts and shares of each outcome over every scored (prompt, position), ``unscored`` left out."""
        import pandas as pd

        codes = self.outcome[self.scored]
        counts = [int((codes == code).sum()) for code in range(1, len(OUTCOMES))]
        total = max(sum(counts), 1)
        return pd.DataFrame({"count": counts, "share": [c / total for c in counts]},
                            index=pd.Index(OUTCOMES[1:], name="outcome"))

    def row_counts(self):
        """Per row (in ``labels`` order): how many targets first became top-1 there (``first_top1``), first
        entered the top-k there (``first_top_k``), peaked there (``peak``) and were overridden there
        (``overridden``: ``lost_row``): which row overrides most often is the ``overridden`` column's maximum."""
        import pandas as pd

        scored = self.scored
        columns = {"first_top1": self.first_top1, "first_top_k": self.first_top_k, "peak": self.peak_row,
                   "overridden": self.lost_row}
        data = {name: torch.bincount(values[scored & (values >= 0)], minlength=len(self.labels)).tolist()
                for name, values in columns.items()}
        return pd.DataFrame(data, index=pd.Index(self.labels, name="row"))

    def overriders(self, n: int = 10) -> list[tuple[str, int]]:
        """The ``n`` tokens that override the target most often, with their counts (most frequent first)."""
        ids = self.overrider_id[self.outcome == OVERRIDDEN].tolist()
        return [(self.token(i), count) for i, count in Counter(ids).most_common(n)]

    def plot(self):
        """Bars per row (first top-1, overridden) and the outcome counts: ``plot.surfaced.surfaced_figure``."""
        from lens_plugins.plot.surfaced import surfaced_figure

        return surfaced_figure(self)

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}={int(count)}" for name, count in self.summary()["count"].items())
        return (f"SurfacedResult(target={self.target!r}, k={self.k}, {len(self.labels)} rows, "
                f"batch={self.outcome.shape[0]}, positions={self.outcome.shape[1]}: {counts})")


def _first(mask: Tensor) -> Tensor:
    """Index of the first True along dim 0 of ``[row, ...]``, -1 where none."""
    any_ = mask.any(0)
    return torch.where(any_, mask.int().argmax(0), torch.full_like(any_, -1, dtype=torch.long))


def _last(mask: Tensor) -> Tensor:
    """Index of the last True along dim 0, -1 where none."""
    n = mask.shape[0]
    first_of_flipped = _first(mask.flip(0))
    return torch.where(first_of_flipped >= 0, n - 1 - first_of_flipped, first_of_flipped)


def _per_prompt_targets(result: LensResult, targets) -> tuple[Tensor, Tensor, Tensor, str]:
    """``(ranks [row, batch, pos], logprobs [row, batch, pos], ids [batch, pos], description)``."""
    rows, batch, n_pos = result.log_partition.shape
    if targets is None:
        ranks, logprobs = result._require("next_token_rank"), result._require("next_token_logprob")
        ids = torch.full((batch, n_pos), -1, dtype=torch.long)
        seq = result.token_ids.shape[1]
        for p, position in enumerate(result.positions):
            if position + 1 < seq:
                ids[:, p] = result.token_ids[:, position + 1]
        return ranks, logprobs, ids, "next token"
    if isinstance(targets, (str, int)):
        targets = [targets] * batch
    targets = list(targets)
    if len(targets) != batch:
        raise LensValueError(f"{len(targets)} targets for {batch} prompts: give one target for every prompt, or one "
                             "for all of them")
    if not result.target_names:
        raise LensValueError("this result scored no targets: pass targets=[...] when computing the lens "
                             "(or targets=None here to follow the actual next token)")
    index = torch.tensor([result._target_index(t) for t in targets])
    gather = index.view(1, batch, 1, 1).expand(rows, batch, n_pos, 1)
    ranks = result.target_ranks.gather(-1, gather).squeeze(-1)
    logprobs = result.target_logprobs.gather(-1, gather).squeeze(-1)
    ids = result.target_ids[index].view(batch, 1).expand(batch, n_pos).clone()
    names = [result.target_names[i] for i in index.tolist()]
    return ranks, logprobs, ids, visible_text(names[0]) if len(set(names)) == 1 else "one per prompt"


@typechecked
def surfaced(result: LensResult, targets: None | str | int | Sequence[str | int] = None, *,
             k: int | None = None) -> SurfacedResult:
    """Where ``targets`` surfaced in ``result``, peaked, and were overridden, at every prompt and position.

    ``targets``: one target (a name or id the lens was computed with, ``targets=[...]``) for every prompt,
    one per prompt (a dataset of prompts, each with its own answer), or ``None`` for the actual next token
    (the ``next_token`` reduction: did the right continuation surface, and what overrode it?). ``k`` sets
    the top-k test (default: the ``top_k`` of the result). The overrider is read from ``top_ids``, so the
    result needs the ``top_k`` reduction (a default one).
    """
    top_ids = result._require("top_ids")
    k = top_ids.shape[-1] if k is None else k
    if k < 1:
        raise LensValueError(f"k must be at least 1, got {k}")
    ranks, logprobs, ids, name = _per_prompt_targets(result, targets)
    mask = result.attention_mask[:, result.positions].bool()
    scored = mask & (ranks >= 1).all(0)
    top1 = ranks == 1
    in_k = (ranks >= 1) & (ranks <= k)
    first_top1, last_top1 = _first(top1), _last(top1)
    first_top_k, last_top_k = _first(in_k), _last(in_k)
    final_rank = ranks[-1]
    kept = final_rank == 1
    overridden = (first_top1 >= 0) & ~kept
    lost_top_k = (first_top_k >= 0) & (final_rank > k)
    outcome = torch.full_like(final_rank, NEVER)
    outcome[first_top_k >= 0] = TOP_K
    outcome[overridden] = OVERRIDDEN
    outcome[kept] = KEPT
    outcome[~scored] = UNSCORED
    none = torch.full_like(final_rank, -1)
    lost_row = torch.where(overridden, last_top1 + 1, none)
    overrider = top_ids[..., 0].gather(0, lost_row.clamp(min=0).unsqueeze(0)).squeeze(0)
    best_rank = ranks.masked_fill(ranks < 1, torch.iinfo(ranks.dtype).max).min(0)

    def only_scored(values: Tensor, fill=-1) -> Tensor:
        return values.masked_fill(~scored, fill)

    peak = logprobs.nan_to_num(float("-inf")).max(0)
    return SurfacedResult(
        labels=list(result.labels), positions=list(result.positions), k=k, target=name,
        token_ids=result.token_ids, vocab_strings=dict(result.vocab_strings), target_ids=only_scored(ids),
        outcome=outcome, first_top1=only_scored(first_top1), first_top_k=only_scored(first_top_k),
        peak_row=only_scored(peak.indices), peak_prob=only_scored(peak.values.exp(), float("nan")),
        best_rank=only_scored(best_rank.values), best_rank_row=only_scored(best_rank.indices),
        last_top1=only_scored(last_top1), lost_row=only_scored(lost_row),
        lost_top_k_row=only_scored(torch.where(lost_top_k, last_top_k + 1, none)),
        overrider_id=only_scored(torch.where(overridden, overrider, none)),
        final_rank=only_scored(final_rank), final_prob=only_scored(logprobs[-1].exp(), float("nan")),
        final_top1_id=only_scored(top_ids[-1, ..., 0]),
    )


__all__ = ["OUTCOMES", "SurfacedResult", "surfaced"]
