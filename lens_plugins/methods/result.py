"""``LensResult``: what a logit lens found, as small labelled tensors that need no model to show.

Axes: ``row`` (a point in the residual stream: "embed", "3_pre", "3_mid", ..., "29_post"), ``batch``,
``pos`` (the positions that were decoded; ``positions`` gives their indices in the prompt) and, where
present, ``k`` (top-k), ``target`` or ``set``. A reduction that was not asked for is ``None``.
"""

import math
from dataclasses import dataclass, fields
from typing import Optional, Union

from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_plugins.core.errors import LensIndexError, LensKeyError, LensValueError
from lens_plugins.core.reductions import FIELD_REDUCTION, METRICS
from lens_plugins.core.track import REASONS
from lens_plugins.files import atomic_write, check_file
from lens_plugins.typecheck import typechecked

_REPR_TOKENS = 6  # tokens of prompt 0 a repr shows: enough to see whether it starts with BOS

RowFloat = Float[Tensor, "row batch pos"]
RowInt = Int[Tensor, "row batch pos"]

# METRICS: the [row, batch, pos] quantities a heatmap can be coloured by ("prob" and "logprob" are the
# top-1's), from the reductions table (``lens_plugins.core.reductions``), as is every optional field below.


@typechecked
@dataclass
class LensResult:
    """Per row, batch item and decoded position: the lens's top-k, entropy, divergences from the final row
    (and from the input row, and from the next row), and the log-prob and rank of the final top-1, of the
    actual next token, of the input token, of user targets and of token sets; with ``auto_tokens=N``, per
    position, the N tokens worth tracking (``auto_ids``, their ``auto_logprobs`` at every row, why each was
    chosen: ``tracked``).

    ``rank`` is 1 for the most likely token; ties share the better rank. Where a position has no token to
    score (the last position's next token, padding) the log-prob is NaN and the rank -1. ``kl_final_row``
    is KL(final || row), the tuned-lens training loss; ``kl_row_final`` is KL(row || final); ``js_final``
    the Jensen-Shannon divergence (<= ln 2); ``tv_final`` the total variation distance (half L1, <= 1).
    """

    labels: list[str]
    positions: list[int]
    token_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    vocab_strings: dict[int, str]
    reductions: list[str]
    log_partition: RowFloat
    target_names: list[str]
    target_ids: Int[Tensor, "target"]
    target_logprobs: Float[Tensor, "row batch pos target"]
    target_ranks: Int[Tensor, "row batch pos target"]
    set_names: list[str]
    set_members: list[list[str]]
    set_logprobs: Float[Tensor, "row batch pos set"]
    set_ranks: Int[Tensor, "row batch pos set"]
    top_ids: Optional[Int[Tensor, "row batch pos k"]] = None
    top_logprobs: Optional[Float[Tensor, "row batch pos k"]] = None
    entropy: Optional[RowFloat] = None
    kl_final_row: Optional[RowFloat] = None
    kl_row_final: Optional[RowFloat] = None
    js_final: Optional[RowFloat] = None
    tv_final: Optional[RowFloat] = None
    kl_input_row: Optional[RowFloat] = None
    kl_next_row: Optional[RowFloat] = None
    final_top1: Optional[Int[Tensor, "batch pos"]] = None
    final_top1_logprob: Optional[RowFloat] = None
    final_top1_rank: Optional[RowInt] = None
    next_token_logprob: Optional[RowFloat] = None
    next_token_rank: Optional[RowInt] = None
    input_token_logprob: Optional[RowFloat] = None
    input_token_rank: Optional[RowInt] = None
    auto_ids: Optional[Int[Tensor, "batch pos n"]] = None
    auto_logprobs: Optional[Float[Tensor, "row batch pos n"]] = None
    auto_reasons: Optional[Int[Tensor, "batch pos n"]] = None
    auto_peak_rows: Optional[Int[Tensor, "batch pos n"]] = None
    auto_scores: Optional[Float[Tensor, "batch pos n"]] = None
    # Per prompt, a label for every position (``lp.vision.label_image_tokens``: "<image 3,7>" for a patch);
    # ``None``: the tokens' own strings.
    token_labels: Optional[list[list[str]]] = None

    def __post_init__(self) -> None:
        if len(self.labels) != self.log_partition.shape[0]:
            raise LensValueError(f"{len(self.labels)} row labels for {self.log_partition.shape[0]} rows")
        if len(self.positions) != self.log_partition.shape[2]:
            raise LensValueError(f"{len(self.positions)} positions for {self.log_partition.shape[2]} decoded positions")

    def _require(self, name: str) -> Tensor:
        value = getattr(self, name)
        if value is None:
            hint = FIELD_REDUCTION.get(name, name)
            if hint == "auto_tokens":
                raise LensValueError(f"{name} was not computed: pass auto_tokens=N (tokens tracked per position) "
                                     "when computing the lens")
            raise LensValueError(f"{name} was not computed: add {hint!r} to reductions=[...] when computing the lens")
        return value

    # --- lookups -------------------------------------------------------------------------------

    @property
    def top_probs(self) -> Float[Tensor, "row batch pos k"]:
        return self._require("top_logprobs").exp()

    def token(self, token_id: int) -> str:
        return self.vocab_strings.get(int(token_id), f"<{int(token_id)}>")

    def str_tokens(self, batch: int = 0) -> list[str]:
        """The prompt's tokens (all positions, not only the decoded ones), as labelled (``token_labels``)."""
        if self.token_labels is not None:
            return list(self.token_labels[batch])
        return [self.token(i) for i in self.token_ids[batch].tolist()]

    def row_index(self, row: Union[int, str]) -> int:
        if isinstance(row, str):
            if row not in self.labels:
                raise LensKeyError(f"no row {row!r}; rows are {self.labels}")
            return self.labels.index(row)
        n = len(self.labels)
        if not -n <= row < n:
            raise LensIndexError(f"row {row} is out of range for {n} rows ({self.labels[0]} .. {self.labels[-1]})")
        return row % n

    def pos_index(self, pos: int) -> int:
        """Index along the ``pos`` axis of prompt position ``pos`` (negative counts from the prompt's end)."""
        seq = self.token_ids.shape[1]
        if not -seq <= pos < seq:
            raise LensIndexError(f"position {pos} is out of range for a prompt of {seq} tokens")
        absolute = pos % seq
        if absolute not in self.positions:
            raise LensIndexError(f"position {pos} was not decoded; decoded positions are {self.positions}")
        return self.positions.index(absolute)

    def top_tokens(self, pos: int = -1, batch: int = 0) -> dict[str, list[tuple[str, float]]]:
        """For each row, the top-k ``(token, probability)`` at prompt position ``pos``."""
        p = self.pos_index(pos)
        ids = self._require("top_ids")[:, batch, p].tolist()
        probs = self.top_probs[:, batch, p].tolist()
        return {
            label: [(self.token(i), q) for i, q in zip(row_ids, row_probs)]
            for label, row_ids, row_probs in zip(self.labels, ids, probs)
        }

    def tracked(self, pos: int = -1, batch: int = 0) -> list[dict]:
        """The tokens ``auto_tokens=N`` chose at prompt position ``pos``, best first: for each, ``token``,
        ``id``, ``reason`` (why it was chosen, ``core.track.REASONS``), ``peak_row`` (the intermediate row where
        it is most likely, or ``None``), ``score`` (that peak probability minus its final-row probability) and
        ``probs`` (its probability at every row, as ``logprob_of(...).exp()`` would give for a target)."""
        p = self.pos_index(pos)
        ids = self._require("auto_ids")[batch, p].tolist()
        chosen = []
        for j, token_id in enumerate(ids):
            if token_id < 0:
                continue
            peak = int(self.auto_peak_rows[batch, p, j])
            chosen.append({
                "token": self.token(token_id), "id": token_id,
                "reason": REASONS[int(self.auto_reasons[batch, p, j])],
                "peak_row": self.labels[peak] if peak >= 0 else None,
                "score": float(self.auto_scores[batch, p, j]),
                "probs": self.auto_logprobs[:, batch, p, j].exp().tolist(),
            })
        return chosen

    def _target_index(self, target: Union[str, int]) -> int:
        if isinstance(target, str) and target in self.target_names:
            return self.target_names.index(target)
        if isinstance(target, int) and target in self.target_ids.tolist():
            return self.target_ids.tolist().index(target)
        raise LensKeyError(
            f"{target!r} was not among the targets of this lens ({self.target_names}); "
            "pass it in targets=[...] when computing the lens"
        )

    def rank_of(self, target: Union[str, int]) -> RowInt:
        """Rank of a target (given by name or id when the lens was computed) at every row and position."""
        return self.target_ranks[..., self._target_index(target)]

    def logprob_of(self, target: Union[str, int]) -> RowFloat:
        return self.target_logprobs[..., self._target_index(target)]

    def _set_index(self, name: str) -> int:
        if name not in self.set_names:
            raise LensKeyError(f"no token set {name!r}; the sets are {self.set_names} (pass token_sets={{name: [...]}})")
        return self.set_names.index(name)

    def set_prob(self, name: str) -> RowFloat:
        """Probability of a token set (its members' probabilities summed) at every row and position: the
        latent-language trajectories of Wendler et al. (2024)."""
        return self.set_logprobs[..., self._set_index(name)].exp()

    def set_rank(self, name: str) -> RowInt:
        """A token set's rank: the best rank among its members."""
        return self.set_ranks[..., self._set_index(name)]

    # --- derived quantities ------------------------------------------------------------------------

    def entropy_bits(self) -> RowFloat:
        return self._require("entropy") / math.log(2)

    def max_prob(self) -> RowFloat:
        """Probability of each row's top guess."""
        return self.top_probs[..., 0]

    def top1_logit(self) -> RowFloat:
        """The logit of each row's top guess (log-prob plus the row's log-partition)."""
        return self._require("top_logprobs")[..., 0] + self.log_partition

    def top1_agreement(self) -> Bool[Tensor, "row batch pos"]:
        """Whether each row's top guess is the final row's."""
        return self._require("top_ids")[..., 0] == self._require("final_top1").unsqueeze(0)

    def scored(self, column: str = "next_token") -> Bool[Tensor, "row batch pos"]:
        """Where a per-position token was scored (not the last position's next token, not padding)."""
        return self._require(f"{column}_rank") >= 0

    def cross_entropy(self) -> Float[Tensor, "row"]:
        """Mean cross-entropy of the actual next token per row (nats), over scored positions only."""
        logprob = self._require("next_token_logprob")
        mask = self.scored("next_token")
        return -(logprob.nan_to_num() * mask).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)

    def top_k_accuracy(self, k: int = 1) -> Float[Tensor, "row"]:
        """Fraction of scored positions whose actual next token ranks within the top ``k``, per row."""
        rank = self._require("next_token_rank")
        mask = self.scored("next_token")
        return ((rank <= k) & mask).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)

    def diff(self, metric: str) -> Float[Tensor, "row_minus_1 batch pos"]:
        """First difference of a ``[row, batch, pos]`` trajectory along the rows: row l+1 minus row l."""
        values = self.metric(metric)
        return values[1:] - values[:-1]

    def metric(self, name: str) -> RowFloat:
        """A named ``[row, batch, pos]`` quantity (one of ``METRICS``), as float for plotting."""
        if name == "prob":
            return self.top_probs[..., 0]
        if name == "logprob":
            return self._require("top_logprobs")[..., 0]
        if name not in METRICS:
            raise LensValueError(f"unknown metric {name!r}; choose one of {METRICS}")
        return self._require(name).float()

    # --- views -----------------------------------------------------------------------------------

    def to_dataframe(self):
        """One row per (lens row, batch item, decoded position) with the top-1 and every computed scalar."""
        import pandas as pd

        scalars = [f.name for f in fields(self) if f.name in METRICS and getattr(self, f.name) is not None]
        records = []
        for r, label in enumerate(self.labels):
            for b in range(self.token_ids.shape[0]):
                for p, position in enumerate(self.positions):
                    record = {"row": label, "batch": b, "pos": position,
                              "input_token": self.token(self.token_ids[b, position])}
                    if self.top_ids is not None:
                        record["top1"] = self.token(self.top_ids[r, b, p, 0])
                        record["top1_prob"] = float(self.top_logprobs[r, b, p, 0].exp())
                    for name in scalars:
                        record[name] = getattr(self, name)[r, b, p].item()
                    for t, name in enumerate(self.target_names):
                        record[f"rank[{name}]"] = int(self.target_ranks[r, b, p, t])
                        record[f"logprob[{name}]"] = float(self.target_logprobs[r, b, p, t])
                    for t, name in enumerate(self.set_names):
                        record[f"set_prob[{name}]"] = float(self.set_logprobs[r, b, p, t].exp())
                    records.append(record)
        return pd.DataFrame.from_records(records)

    def plot(self, metric: str = "prob", batch: int = 0):
        """A plotly heatmap, rows x positions, coloured by ``metric`` and labelled with each top-1."""
        from lens_plugins.plot.figures import lens_heatmap

        return lens_heatmap(self, metric=metric, batch=batch)

    def to_html(self, path: str, metric: str = "prob", batch: int = 0, *, overwrite: bool = False) -> None:
        """One metric's heatmap as a self-contained HTML file; an existing file is refused unless ``overwrite``."""
        check_file(path, overwrite=overwrite)
        figure = self.plot(metric, batch)
        with atomic_write(path) as staging:
            figure.write_html(staging, include_plotlyjs=True)

    def table(self, batch: int = 0, max_positions: Optional[int] = None) -> list[list[str]]:
        """Rows x positions of ``"top1 (prob)"`` strings, the text form of the heatmap."""
        positions = range(len(self.positions))
        if max_positions is not None:
            positions = positions[-max_positions:]
        ids = self._require("top_ids")
        probs = self.top_probs
        return [
            [f"{self.token(ids[r, batch, p, 0])!r} {probs[r, batch, p, 0].item():.2f}" for p in positions]
            for r in range(len(self.labels))
        ]

    def __repr__(self) -> str:
        """Rows, batch, positions, reductions and the first tokens of prompt 0 as they ran (padding left out),
        so that a BOS the tokenization added, or did not, is in plain sight."""
        rows, batch, pos = self.log_partition.shape
        real = [self.token(int(i)) for i, m in zip(self.token_ids[0], self.attention_mask[0]) if m]
        shown = repr(real[:_REPR_TOKENS])[:-1] + (f", ... {len(real)} tokens]" if len(real) > _REPR_TOKENS else "]")
        return (
            f"LensResult({rows} rows [{self.labels[0]} .. {self.labels[-1]}], batch={batch}, tokens={shown}, "
            f"positions={self.positions if pos <= 8 else f'{pos} positions'}, reductions={self.reductions}, "
            f"targets={self.target_names}, sets={self.set_names})"
        )

__all__ = ["RowFloat", "RowInt", "LensResult"]
