"""``LensResult``: what a logit lens found, as small labelled tensors that need no model to show.

Axes: ``row`` (a point in the residual stream: "embed", "3_pre", "3_mid", ..., "29_post"),
``batch``, ``pos`` (the positions that were decoded, ``positions`` gives their indices in the
prompt) and, where present, ``k`` (top-k) or ``target``.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins.typecheck import typechecked

METRICS = (
    "prob", "logprob", "entropy", "kl_final_row", "kl_row_final", "final_top1_rank", "final_top1_logprob",
    "next_token_rank", "next_token_logprob",
)


@typechecked
@dataclass
class LensResult:
    """Per row, batch item and decoded position: the lens's top-k, entropy, divergences from the final
    row, and the log-prob and rank of the final top-1, of the actual next token and of user targets.

    ``rank`` is 1 for the most likely token; ties share the better rank. Where a position has no next
    token (the last one), its log-prob is NaN and its rank -1. ``kl_final_row`` is KL(final || row),
    the tuned-lens training loss; ``kl_row_final`` is KL(row || final).
    """

    labels: list[str]
    positions: list[int]
    token_ids: Int[Tensor, "batch seq"]
    vocab_strings: dict[int, str]
    top_ids: Int[Tensor, "row batch pos k"]
    top_logprobs: Float[Tensor, "row batch pos k"]
    entropy: Float[Tensor, "row batch pos"]
    kl_final_row: Float[Tensor, "row batch pos"]
    kl_row_final: Float[Tensor, "row batch pos"]
    final_top1: Int[Tensor, "batch pos"]
    final_top1_logprob: Float[Tensor, "row batch pos"]
    final_top1_rank: Int[Tensor, "row batch pos"]
    next_token_logprob: Float[Tensor, "row batch pos"]
    next_token_rank: Int[Tensor, "row batch pos"]
    target_names: list[str]
    target_ids: Int[Tensor, "target"]
    target_logprobs: Float[Tensor, "row batch pos target"]
    target_ranks: Int[Tensor, "row batch pos target"]

    def __post_init__(self) -> None:
        if len(self.labels) != self.top_ids.shape[0]:
            raise ValueError(f"{len(self.labels)} row labels for {self.top_ids.shape[0]} rows")
        if len(self.positions) != self.top_ids.shape[2]:
            raise ValueError(f"{len(self.positions)} positions for {self.top_ids.shape[2]} decoded positions")

    # --- lookups -------------------------------------------------------------------------------

    @property
    def top_probs(self) -> Float[Tensor, "row batch pos k"]:
        return self.top_logprobs.exp()

    def token(self, token_id: int) -> str:
        return self.vocab_strings.get(int(token_id), f"<{int(token_id)}>")

    def str_tokens(self, batch: int = 0) -> list[str]:
        """The prompt's tokens (all positions, not only the decoded ones)."""
        return [self.token(i) for i in self.token_ids[batch].tolist()]

    def row_index(self, row: Union[int, str]) -> int:
        if isinstance(row, str):
            if row not in self.labels:
                raise KeyError(f"no row {row!r}; rows are {self.labels}")
            return self.labels.index(row)
        n = len(self.labels)
        if not -n <= row < n:
            raise IndexError(f"row {row} is out of range for {n} rows ({self.labels[0]} .. {self.labels[-1]})")
        return row % n

    def pos_index(self, pos: int) -> int:
        """Index along the ``pos`` axis of prompt position ``pos`` (negative counts from the prompt's end)."""
        seq = self.token_ids.shape[1]
        if not -seq <= pos < seq:
            raise IndexError(f"position {pos} is out of range for a prompt of {seq} tokens")
        absolute = pos % seq
        if absolute not in self.positions:
            raise IndexError(f"position {pos} was not decoded; decoded positions are {self.positions}")
        return self.positions.index(absolute)

    def top_tokens(self, pos: int = -1, batch: int = 0) -> dict[str, list[tuple[str, float]]]:
        """For each row, the top-k ``(token, probability)`` at prompt position ``pos``."""
        p = self.pos_index(pos)
        ids = self.top_ids[:, batch, p].tolist()
        probs = self.top_probs[:, batch, p].tolist()
        return {
            label: [(self.token(i), q) for i, q in zip(row_ids, row_probs)]
            for label, row_ids, row_probs in zip(self.labels, ids, probs)
        }

    def _target_index(self, target: Union[str, int]) -> int:
        if isinstance(target, str) and target in self.target_names:
            return self.target_names.index(target)
        if isinstance(target, int) and target in self.target_ids.tolist():
            return self.target_ids.tolist().index(target)
        raise KeyError(
            f"{target!r} was not among the targets of this lens ({self.target_names}); "
            "pass it in targets=[...] when computing the lens"
        )

    def rank_of(self, target: Union[str, int]) -> Int[Tensor, "row batch pos"]:
        """Rank of a target (given by name or id when the lens was computed) at every row and position."""
        return self.target_ranks[..., self._target_index(target)]

    def logprob_of(self, target: Union[str, int]) -> Float[Tensor, "row batch pos"]:
        return self.target_logprobs[..., self._target_index(target)]

    def metric(self, name: str) -> Float[Tensor, "row batch pos"]:
        """A named ``[row, batch, pos]`` quantity (one of ``METRICS``), as float for plotting."""
        if name == "prob":
            return self.top_probs[..., 0]
        if name == "logprob":
            return self.top_logprobs[..., 0]
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; choose one of {METRICS}")
        return getattr(self, name).float()

    # --- views -----------------------------------------------------------------------------------

    def to_dataframe(self):
        """One row per (lens row, batch item, decoded position) with the top-1 and every scalar metric."""
        import pandas as pd

        records = []
        for r, label in enumerate(self.labels):
            for b in range(self.token_ids.shape[0]):
                for p, position in enumerate(self.positions):
                    record = {
                        "row": label, "batch": b, "pos": position,
                        "input_token": self.token(self.token_ids[b, position]),
                        "top1": self.token(self.top_ids[r, b, p, 0]),
                        "top1_prob": float(self.top_probs[r, b, p, 0]),
                        "entropy": float(self.entropy[r, b, p]),
                        "kl_final_row": float(self.kl_final_row[r, b, p]),
                        "kl_row_final": float(self.kl_row_final[r, b, p]),
                        "final_top1_rank": int(self.final_top1_rank[r, b, p]),
                        "next_token_rank": int(self.next_token_rank[r, b, p]),
                        "next_token_logprob": float(self.next_token_logprob[r, b, p]),
                    }
                    for t, name in enumerate(self.target_names):
                        record[f"rank[{name}]"] = int(self.target_ranks[r, b, p, t])
                        record[f"logprob[{name}]"] = float(self.target_logprobs[r, b, p, t])
                    records.append(record)
        return pd.DataFrame.from_records(records)

    def plot(self, metric: str = "prob", batch: int = 0):
        """A plotly heatmap, rows x positions, coloured by ``metric`` and labelled with each top-1."""
        from lens_plugins.plot import lens_heatmap

        return lens_heatmap(self, metric=metric, batch=batch)

    def to_html(self, path: str, metric: str = "prob", batch: int = 0) -> None:
        self.plot(metric, batch).write_html(path, include_plotlyjs=True)

    def table(self, batch: int = 0, max_positions: Optional[int] = None) -> list[list[str]]:
        """Rows x positions of ``"top1 (prob)"`` strings, the text form of the heatmap."""
        positions = range(len(self.positions))
        if max_positions is not None:
            positions = positions[-max_positions:]
        cells = []
        for r in range(len(self.labels)):
            cells.append([
                f"{self.token(self.top_ids[r, batch, p, 0])!r} {self.top_probs[r, batch, p, 0].item():.2f}"
                for p in positions
            ])
        return cells

    def __repr__(self) -> str:
        rows, batch, pos, k = self.top_ids.shape
        return (
            f"LensResult({rows} rows [{self.labels[0]} .. {self.labels[-1]}], batch={batch}, "
            f"positions={self.positions if pos <= 8 else f'{pos} positions'}, top_k={k}, "
            f"targets={self.target_names})"
        )

