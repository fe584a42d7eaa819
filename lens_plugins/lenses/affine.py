"""Lenses: the per-row map applied to the residual stack before the final norm and the unembedding.

A lens is any object with ``transform(resid, rows)``, ``resid [rows, tokens, d_model]`` -> the same shape,
plain differentiable torch (the pipeline calls it under ``no_grad``; training and evaluation call it with
grad). A lens that is a per-row affine map applied residually, ``h + h @ weight[r].T + bias[r]`` (the
tuned-lens convention), also says so with ``affine(rows, d_model) -> (weight [rows, d, d] | None,
bias [rows, d] | None)``: then the pipeline applies it with ``lens_plugins.core.lenses.apply_affine`` on
every backend, and ships the tensors to a remote trace. A lens without ``affine`` runs only where its
``transform`` can run (a cache, a local trace). ``LogitLens`` is the identity.
"""

from collections.abc import Sequence
from typing import Optional, Protocol, runtime_checkable

from jaxtyping import Float
from torch import Tensor

from lens_plugins.core.errors import LensKeyError, LensTypeError, LensValueError
from lens_plugins.core.lenses import apply_affine
from lens_plugins.core.rows import Row


@runtime_checkable
class Lens(Protocol):
    """What ``lens=`` accepts on every lens entry point of both backends."""

    def transform(self, resid: Float[Tensor, "rows tokens d_model"], rows: Sequence[Row]) -> Float[Tensor, "rows tokens d_model"]:
        ...


class LogitLens:
    """The logit lens: every row decoded as it is (the identity map)."""

    def transform(self, resid: Float[Tensor, "rows tokens d_model"], rows: Sequence[Row]) -> Float[Tensor, "rows tokens d_model"]:
        return resid

    def affine(self, rows: Sequence[Row], d_model: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return None, None


def check_affine_shapes(n_rows: int, weight: Optional[Tensor], bias: Optional[Tensor], where: str) -> None:
    """Refuse per-row affine maps whose shapes do not fit one another: ``weight [n_rows, d, d]`` and
    ``bias [n_rows, d]``, one map per row label. Checked where the lens is made (``where`` names it: the
    class, or the file it was loaded from), since a wrong shape would otherwise fail deep in torch on the first
    lens call, or index another row's map."""
    expected = {"weight": (n_rows, "d", "d"), "bias": (n_rows, "d")}
    widths = set()
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            raise LensTypeError(f"{where}: {name} must be a tensor or None, got a {type(tensor).__name__}")
        shape = tuple(tensor.shape)
        fits = len(shape) == len(expected[name]) and shape[0] == n_rows and len(set(shape[1:])) == 1
        if not fits:
            raise LensValueError(
                f"{where}: {name} has shape {shape}, but {n_rows} row label(s) need {name} of shape "
                f"{tuple(expected[name])} (one {'d x d matrix' if name == 'weight' else 'd-vector'} per label, "
                "d = d_model): give one map per label, in the labels' order")
        widths.add(shape[-1])
    if len(widths) > 1:
        raise LensValueError(f"{where}: weight is {weight.shape[-1]} wide but bias is {bias.shape[-1]}: both must "
                             "have the model's d_model")


class AffineLens:
    """A per-row affine lens from tensors, applied residually: ``h + h @ weight[r].T + bias[r]``, with
    ``weight [rows, d, d]`` and ``bias [rows, d]`` (either may be ``None``) indexed by row label."""

    def __init__(self, labels: Sequence[str], weight: Optional[Tensor] = None, bias: Optional[Tensor] = None):
        check_affine_shapes(len(labels), weight, bias, "AffineLens")
        self.labels = list(labels)
        self.weight = weight
        self.bias = bias

    def _index(self, rows: Sequence[Row]) -> list[int]:
        missing = [row.label for row in rows if row.label not in self.labels]
        if missing:
            raise LensKeyError(f"this lens has no map for rows {missing}; it has {self.labels}")
        return [self.labels.index(row.label) for row in rows]

    def affine(self, rows: Sequence[Row], d_model: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        index = self._index(rows)
        return (None if self.weight is None else self.weight[index],
                None if self.bias is None else self.bias[index])

    def transform(self, resid: Float[Tensor, "rows tokens d_model"], rows: Sequence[Row]) -> Float[Tensor, "rows tokens d_model"]:
        return apply_affine(resid, *self.affine(rows, resid.shape[-1]))

__all__ = ["Lens", "LogitLens", "check_affine_shapes", "AffineLens"]
