"""The decoder every lens reads through: final norm, then ``W_U`` (+ ``b_U``) (+ logit soft-cap).

Adapters build a ``Decoder`` from whatever model they see (a TransformerLens model, an nnsight-wrapped
Hugging Face model); everything downstream of it is shared, which is why the two backends agree. It is the
type-checked face of ``core.readout.DecoderTensors``, the one decoder value the core takes (inside a remote
trace the core builds that plain value itself, where no type checker runs).
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins.core import readout
from lens_plugins.core.errors import LensValueError
from lens_plugins.typecheck import typechecked

NormKind = Literal["rmsnorm", "layernorm", "none"]


@typechecked
@dataclass(frozen=True)
class Decoder(readout.DecoderTensors):
    """``logits = softcap(final_norm(h) @ W_U + b_U)``.

    ``norm_weight`` is the multiplier the norm really applies: Gemma-style ``(1 + w)`` norms store
    ``1 + w`` here, so the readout needs no per-family branch. ``W_U`` is ``[d_model, vocab]`` as in
    TransformerLens (a Hugging Face ``lm_head.weight`` is its transpose).

    Attributes:
        norm_kind: ``"rmsnorm"``, ``"layernorm"`` or ``"none"``: the model's final norm.
        W_U: the unembedding ``[d_model, vocab]``.
        norm_weight: the multiplier the final norm applies ``[d_model]`` (``None``: 1).
        norm_bias: the final norm's bias ``[d_model]``, for a LayerNorm.
        norm_eps: the final norm's epsilon.
        b_U: the unembedding bias ``[vocab]``.
        softcap: the logit soft-cap (Gemma 2: ``cap * tanh(logits / cap)``), or ``None``.

    Raises:
        LensValueError: a tensor of the wrong shape, or holding NaN or inf.
    """

    norm_kind: NormKind
    W_U: Float[Tensor, "d_model vocab"]
    norm_weight: Optional[Float[Tensor, "d_model"]] = None
    norm_bias: Optional[Float[Tensor, "d_model"]] = None
    norm_eps: float = 1e-5
    b_U: Optional[Float[Tensor, "vocab"]] = None
    softcap: Optional[float] = None

    @classmethod
    def of(cls, tensors: readout.DecoderTensors) -> "Decoder":
        """The checked public ``Decoder`` of a core ``DecoderTensors`` (as ``architectures.decoder_tensors``
        reads it), detached and in float32: what a lens decodes saved activations with."""
        frozen = tensors.detached(torch.float32)
        return cls(**{field.name: getattr(frozen, field.name) for field in fields(frozen)})

    @typechecked
    def logits(self, resid: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead vocab"]:
        """Full-vocabulary float32 logits of ``resid``. Memory grows with ``lead x vocab``: use it for a
        few rows, and ``statistics`` for a whole stack."""
        self.check_width(resid)
        return self.unembed(self.normalize(resid))

    @typechecked
    def statistics(
        self,
        resid: Float[Tensor, "row token d_model"],
        target_ids: Int[Tensor, "token n_targets"],
        top_k: int,
        vocab_chunk: Optional[int] = None,
        token_chunk: Optional[int] = None,
        reductions: Sequence[str] = readout.DEFAULT_REDUCTIONS,
        precision: str = "float32",
    ) -> dict[str, Tensor]:
        """The streamed reductions of ``readout.lens_statistics`` (its docstring lists them, the tile sizes
        that ``None`` picks and the ``precision`` modes)."""
        self.check_width(resid)
        if top_k < 1:
            raise LensValueError(f"top_k must be at least 1, got {top_k}")
        with torch.no_grad():
            return readout.lens_statistics(
                resid, self, top_k, target_ids, vocab_chunk=vocab_chunk, token_chunk=token_chunk,
                reductions=(reductions,) if isinstance(reductions, str) else tuple(reductions),
                precision=precision,
            )

    def check_width(self, resid: Tensor) -> None:
        if resid.shape[-1] != self.d_model:
            raise LensValueError(
                f"residual vectors have width {resid.shape[-1]} but this decoder's W_U expects d_model="
                f"{self.d_model}: the activations come from a different model than the one decoding them"
            )

    def tensors(self) -> dict:
        """Deprecated: the core now takes the ``Decoder`` itself (a ``core.readout.DecoderTensors``)."""
        warnings.warn("Decoder.tensors() is deprecated and will be removed in 0.3: pass the Decoder itself, "
                      "which the core functions now take", DeprecationWarning, stacklevel=2)
        return {name: getattr(self, name) for name in
                ("norm_kind", "norm_weight", "norm_bias", "norm_eps", "W_U", "b_U", "softcap")}

__all__ = ["NormKind", "Decoder"]
