"""Jump to conclusions (Din et al., LREC-COLING 2024): linear shortcuts from every row to the last, how well
each lens predicts the model's own top-1, and early exit.

``fit_shortcuts(model, texts)`` fits, for every hidden state ``l``, the least-squares affine map to the last
hidden state in closed form (``training.tuned_lens.shortcut_init``: one ``[d + 1, d + 1]`` Gram matrix per
row accumulated block by block in float64, so memory is bounded by one block's residual stack) and returns it
as a ``TunedLens``: an affine lens, so ``lens=`` takes it on both backends and ships it to remote traces.
The target is the last hidden state rescaled to the input's RMS (the final norm is blind to scale), a
small departure from the paper's plain ``h_L ~ A h_l``.

The rest reads ``LensResult``s only (any backend, any lens): ``shortcut_scores`` gives per-row precision@1
(the row's top-1 is the model's final top-1) and surprisal (``-log p_row(final top-1)``, nats);
``early_exit`` sweeps a confidence threshold (top-1 probability, or entropy) and exits every token at the
first row that is confident enough, reporting the share of exits whose prediction is the model's own
(accuracy retained) against the share of layers skipped, and the layers saved at a target retention.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from lens_plugins.core.errors import LensValueError
from lens_plugins.core.rows import Row
from lens_plugins.methods.result import LensResult
from lens_plugins.typecheck import typechecked

CRITERIA = ("prob", "entropy")
REDUCTIONS = ("top_k", "entropy", "final_top1")
"""What ``shortcut_scores`` and ``early_exit`` read (``top_k=1`` is enough)."""


def fit_shortcuts(model, texts=None, *, seq_len: int = 128, max_blocks: int = 32, ridge: float = 1e-4):
    """Least-squares maps from every hidden state to the last one, fitted on ``texts`` (a text source as in
    training, ``None`` for the built-in corpus, or token blocks ``[blocks, seq]``), at most ``max_blocks``
    blocks of ``seq_len`` tokens, as a ``TunedLens``. Evaluate it on other text than it was fitted on."""
    from lens_plugins.backends.hf import hf_model
    from lens_plugins.lenses.tuned import TunedLens
    from lens_plugins.training.tuned_lens import shortcut_init, token_blocks_of

    if max_blocks < 1:
        raise LensValueError(f"max_blocks must be at least 1, got {max_blocks}")
    hf = hf_model(model)
    blocks = token_blocks_of(model, texts, seq_len)[:max_blocks]
    lens = TunedLens.for_model(hf)
    was_training = hf.training
    hf.eval()
    try:
        with torch.no_grad():
            shortcut_init(lens, hf, blocks, ridge=ridge)
    finally:
        hf.train(was_training)
    return lens


def _real(result: LensResult) -> Tensor:
    """``[batch, pos]`` mask of the decoded positions that are real tokens."""
    return result.attention_mask[:, result.positions].bool()


@typechecked
@dataclass
class ShortcutScores:
    """Per lens and row: ``precision_at_1`` (share of real positions whose top-1 is the model's final top-1)
    and ``surprisal`` (mean ``-log p`` of the final top-1, nats), over ``tokens`` positions."""

    lens_names: list[str]
    labels: list[str]
    precision_at_1: Float[Tensor, "lens row"]
    surprisal: Float[Tensor, "lens row"]
    tokens: int

    def to_dataframe(self):
        """One line per (lens, row)."""
        import pandas as pd

        return pd.DataFrame.from_records([
            {"lens": lens, "row": row, "precision_at_1": float(self.precision_at_1[i, j]),
             "surprisal": float(self.surprisal[i, j])}
            for i, lens in enumerate(self.lens_names) for j, row in enumerate(self.labels)])

    def plot(self):
        """Precision@1 and surprisal per row, a line per lens (``plot.lens_comparison_figure``)."""
        from lens_plugins.plot.figures import lens_comparison_figure

        frame = self.to_dataframe()
        return lens_comparison_figure(frame, ("precision_at_1", "surprisal"))


def shortcut_scores(results: Mapping[str, LensResult]) -> ShortcutScores:
    """Precision@1 and surprisal per row of several lenses' results on the same prompts (name -> result)."""
    if not results:
        raise LensValueError("no result to score: pass {'identity': result, 'shortcut': result, ...}")
    names = list(results)
    first = results[names[0]]
    precision, surprisal = [], []
    for name in names:
        result = results[name]
        if result.labels != first.labels or not torch.equal(result.token_ids, first.token_ids):
            raise LensValueError(f"result {name!r} has other rows or prompts than {names[0]!r}: compute every lens "
                                 "on the same prompts with the same layers=")
        real = _real(result)
        n = real.sum().clamp(min=1)
        precision.append((result.top1_agreement() & real).sum((1, 2)) / n)
        surprisal.append(-(result._require("final_top1_logprob").nan_to_num() * real).sum((1, 2)) / n)
    return ShortcutScores(lens_names=names, labels=list(first.labels), precision_at_1=torch.stack(precision).float(),
                          surprisal=torch.stack(surprisal).float(), tokens=int(_real(first).sum()))


@typechecked
@dataclass
class EarlyExitCurve:
    """Per threshold: ``retention`` (share of exits predicting the model's own top-1), ``layers_saved``
    (mean share of the ``n_layers`` blocks not run) and ``exit_layer`` (mean blocks run), over ``tokens``."""

    criterion: str
    thresholds: Float[Tensor, "threshold"]
    retention: Float[Tensor, "threshold"]
    layers_saved: Float[Tensor, "threshold"]
    exit_layer: Float[Tensor, "threshold"]
    n_layers: int
    tokens: int

    def layers_saved_at(self, retention: float = 0.95) -> float:
        """The largest share of layers saved by a threshold that keeps at least ``retention`` (0 if none)."""
        ok = self.retention >= retention
        return float(self.layers_saved[ok].max()) if ok.any() else 0.0

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"threshold": self.thresholds.tolist(), "retention": self.retention.tolist(),
                             "layers_saved": self.layers_saved.tolist(), "exit_layer": self.exit_layer.tolist()})

    def plot(self, target: float = 0.95):
        from lens_plugins.plot.early_exit import early_exit_figure

        return early_exit_figure(self, target)


def _layers_run(labels: list[str]) -> Tensor:
    try:
        run = [Row.parse(label).hidden_index for label in labels]
    except LensValueError:
        run = [None]
    if any(index is None for index in run):
        raise LensValueError(f"early exit needs residual rows (embed, <l>_pre, <l>_post), got {labels}: compute "
                             "the lens without sublayers= or resid_mid=")
    return torch.tensor(run, dtype=torch.float32)


DEFAULT_THRESHOLDS = {"prob": torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97,
                                            0.99, 0.999, 1.0]),
                      "entropy": torch.tensor([8.0, 6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.75, 0.5, 0.25, 0.1,
                                               0.05, 0.01, 0.0])}


def early_exit(result: LensResult, thresholds: Tensor | list[float] | None = None, *,
               criterion: str = "prob") -> EarlyExitCurve:
    """Exit each real decoded position at the first row whose top-1 probability is at least the threshold
    (``criterion="prob"``) or whose entropy is at most it (``"entropy"``, nats); the final row always exits.
    A row's prediction is its top-1, so run the lens (``lens=``: identity, ``fit_shortcuts``, tuned) whose
    predictions you would exit with."""
    if criterion not in CRITERIA:
        raise LensValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    thresholds = DEFAULT_THRESHOLDS[criterion] if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float32)
    if thresholds.dim() != 1 or len(thresholds) == 0:
        raise LensValueError("thresholds must be a non-empty list of numbers")
    run = _layers_run(result.labels)
    n_layers = float(run[-1])
    real = _real(result)
    confidence = result.max_prob() if criterion == "prob" else result._require("entropy")  # [row, batch, pos]
    correct = result.top1_agreement()
    shape = (-1,) + (1,) * confidence.dim()
    t = thresholds.view(shape)
    confident = confidence.unsqueeze(0) >= t if criterion == "prob" else confidence.unsqueeze(0) <= t
    confident[:, -1] = True  # [threshold, row, batch, pos]
    exit_row = confident.int().argmax(1)  # the first confident row
    hit = correct.unsqueeze(0).expand_as(confident).gather(1, exit_row.unsqueeze(1)).squeeze(1)
    layers = run[exit_row]
    n = real.sum().clamp(min=1)
    return EarlyExitCurve(
        criterion=criterion, thresholds=thresholds.float(), retention=((hit & real).sum((1, 2)) / n).float(),
        layers_saved=(((n_layers - layers) * real).sum((1, 2)) / n / n_layers).float(),
        exit_layer=((layers * real).sum((1, 2)) / n).float(), n_layers=int(n_layers), tokens=int(real.sum()))


__all__ = [
    "CRITERIA",
    "DEFAULT_THRESHOLDS",
    "REDUCTIONS",
    "EarlyExitCurve",
    "ShortcutScores",
    "early_exit",
    "fit_shortcuts",
    "shortcut_scores",
]
