"""Anomaly detection from lens trajectories (Belrose et al. 2023, section 5): how a prompt's latent
predictions converge across the rows says whether it looks like the text a detector was fitted on.

``trajectory_features(result)`` turns a ``LensResult`` (either backend, any ``lens=``) into one feature
vector per prompt: per row, KL(final || row), the entropy and the share of positions whose top-1 already is
the final top-1, each averaged over the prompt's real (unpadded) decoded positions. These are reductions the
lens computes anyway (``kl_final_row``, ``entropy``, ``top_k`` with ``final_top1``). The final row's KL and
agreement are constants (0 and 1) and are left out. ``AnomalyDetector`` standardises the features and fits
scikit-learn's ``IsolationForest`` or ``LocalOutlierFactor`` (novelty mode) on normal text; ``score`` says
how anomalous new prompts are (higher: more anomalous), and ``auroc`` how well those scores separate normal
from shifted prompts (``sklearn.metrics.roc_auc_score``). scikit-learn is the ``analysis`` extra.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from lens_plugins.core.errors import LensRuntimeError, LensValueError
from lens_plugins.methods.result import LensResult
from lens_plugins.typecheck import typechecked

FEATURES = ("kl_final_row", "entropy", "top1_agreement")
DETECTORS = ("isolation_forest", "local_outlier_factor")
REDUCTIONS = ("top_k", "entropy", "kl_final_row", "final_top1")
"""What a lens must compute for ``trajectory_features`` (pass ``reductions=REDUCTIONS``; ``top_k=1`` is enough)."""


@typechecked
@dataclass
class TrajectoryFeatures:
    """``values[prompt, feature]``, named ``"<feature>[<row label>]"`` in ``names`` (``FEATURES`` order, rows
    from the embedding up within each)."""

    names: list[str]
    values: Float[Tensor, "batch feature"]

    def __post_init__(self) -> None:
        if len(self.names) != self.values.shape[1]:
            raise LensValueError(f"{len(self.names)} feature names for {self.values.shape[1]} features")

    def __len__(self) -> int:
        return self.values.shape[0]

    @classmethod
    def concat(cls, parts: Sequence["TrajectoryFeatures"]) -> "TrajectoryFeatures":
        """The prompts of several results (e.g. batches of one dataset), which must share their rows."""
        parts = list(parts)
        if not parts:
            raise LensValueError("nothing to concatenate: give at least one TrajectoryFeatures")
        for part in parts[1:]:
            check_same_features(parts[0].names, part.names)
        return cls(names=list(parts[0].names), values=torch.cat([part.values for part in parts]))

    def to_dataframe(self):
        """One line per prompt, one column per feature."""
        import pandas as pd

        return pd.DataFrame(self.values.numpy(), columns=self.names)


def check_same_features(expected: Sequence[str], got: Sequence[str]) -> None:
    if list(expected) != list(got):
        missing = [name for name in expected if name not in got][:3]
        raise LensValueError(
            f"these features do not match the ones the detector was fitted on ({len(got)} vs {len(expected)}; "
            f"e.g. missing {missing}): compute every lens with the same rows (layers=...) and the same lens")


def trajectory_features(result: LensResult) -> TrajectoryFeatures:
    """Per prompt: the per-row mean KL(final || row), entropy and top-1 agreement with the final row over its
    real decoded positions (a prompt with none is refused: give it at least one unpadded decoded position)."""
    for name in ("kl_final_row", "entropy", "top_ids", "final_top1"):
        result._require(name)
    mask = result.attention_mask[:, result.positions].float()  # [batch, pos]
    counts = mask.sum(1)
    if (counts == 0).any():
        empty = (counts == 0).nonzero().flatten().tolist()
        raise LensValueError(f"prompt(s) {empty} have no real token among the decoded positions {result.positions}: "
                             "decode positions that are not padding (e.g. padding_side='left' with positions=[-1])")
    per_row = {"kl_final_row": result.kl_final_row[:-1], "entropy": result.entropy,
               "top1_agreement": result.top1_agreement()[:-1].float()}
    names, columns = [], []
    for feature in FEATURES:
        values = per_row[feature].nan_to_num(0.0)  # [row, batch, pos]
        columns.append((values * mask).sum(-1).T / counts[:, None])  # [batch, row]
        names += [f"{feature}[{label}]" for label in result.labels[:values.shape[0]]]
    return TrajectoryFeatures(names=names, values=torch.cat(columns, 1).float())


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError as error:
        raise LensRuntimeError("anomaly detection needs scikit-learn: pip install 'lens_plugins[analysis]' "
                               f"(importing it failed: {error})") from error


class AnomalyDetector:
    """A scikit-learn outlier detector on standardised trajectory features, fitted on normal text.

    ``method``: ``"isolation_forest"`` (``sklearn.ensemble.IsolationForest``) or ``"local_outlier_factor"``
    (``sklearn.neighbors.LocalOutlierFactor`` with ``novelty=True``, which may score prompts it was not
    fitted on); ``params`` go to the estimator (``n_estimators=``, ``n_neighbors=`` ...). ``seed`` fixes the
    forest, so one fit gives the same scores every time.
    """

    def __init__(self, method: str = "isolation_forest", *, seed: int = 0, **params):
        if method not in DETECTORS:
            raise LensValueError(f"unknown detector {method!r}: choose one of {DETECTORS}")
        _sklearn()
        self.method = method
        self.seed = seed
        self.params = params
        self.names: list[str] | None = None
        self._model = None

    def _estimator(self):
        from sklearn.ensemble import IsolationForest
        from sklearn.neighbors import LocalOutlierFactor
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if self.method == "isolation_forest":
            estimator = IsolationForest(**{"n_estimators": 200, "random_state": self.seed, **self.params})
        else:
            estimator = LocalOutlierFactor(**{"n_neighbors": 20, **self.params, "novelty": True})
        return make_pipeline(StandardScaler(), estimator)

    def fit(self, features: TrajectoryFeatures) -> "AnomalyDetector":
        """Fit on the features of normal prompts (at least two)."""
        if len(features) < 2:
            raise LensValueError(f"fitting a detector needs at least 2 normal prompts, got {len(features)}")
        self._model = self._estimator().fit(features.values.double().numpy())
        self.names = list(features.names)
        return self

    def score(self, features: TrajectoryFeatures) -> Float[Tensor, "batch"]:
        """Anomaly scores (``-score_samples``: higher is more anomalous) of new prompts."""
        if self._model is None:
            raise LensValueError("this detector is not fitted: call .fit(normal_features) first")
        check_same_features(self.names, features.names)
        return torch.from_numpy(-self._model.score_samples(features.values.double().numpy())).float()


def auroc(normal_scores: Tensor, anomalous_scores: Tensor) -> float:
    """Area under the ROC curve of ``anomalous`` (positive) vs ``normal`` scores: 1.0 separates them
    perfectly, 0.5 is chance (``sklearn.metrics.roc_auc_score``)."""
    _sklearn()
    from sklearn.metrics import roc_auc_score

    if len(normal_scores) == 0 or len(anomalous_scores) == 0:
        raise LensValueError("AUROC needs at least one normal and one anomalous score")
    labels = [0] * len(normal_scores) + [1] * len(anomalous_scores)
    scores = torch.cat([normal_scores.flatten(), anomalous_scores.flatten()]).double().numpy()
    return float(roc_auc_score(labels, scores))


__all__ = [
    "DETECTORS",
    "FEATURES",
    "REDUCTIONS",
    "AnomalyDetector",
    "TrajectoryFeatures",
    "auroc",
    "check_same_features",
    "trajectory_features",
]
