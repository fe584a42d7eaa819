"""The decoder every lens reads through: final norm, then ``W_U`` (+ ``b_U``) (+ logit soft-cap).

Adapters build a ``Decoder`` from whatever model they see (a TransformerLens model, an nnsight-wrapped
Hugging Face model); everything downstream of it is shared, which is why the two backends agree.
"""

from collections.abc import Sequence
from dataclasses import dataclass
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
class Decoder:
    """``logits = softcap(final_norm(h) @ W_U + b_U)``.

    ``norm_weight`` is the multiplier the norm really applies: Gemma-style ``(1 + w)`` norms store
    ``1 + w`` here, so the readout needs no per-family branch. ``W_U`` is ``[d_model, vocab]`` as in
    TransformerLens (a Hugging Face ``lm_head.weight`` is its transpose).
    """

    norm_kind: NormKind
    W_U: Float[Tensor, "d_model vocab"]
    norm_weight: Optional[Float[Tensor, "d_model"]] = None
    norm_bias: Optional[Float[Tensor, "d_model"]] = None
    norm_eps: float = 1e-5
    b_U: Optional[Float[Tensor, "vocab"]] = None
    softcap: Optional[float] = None

    @property
    def d_model(self) -> int:
        return self.W_U.shape[0]

    @property
    def d_vocab(self) -> int:
        return self.W_U.shape[1]

    @typechecked
    def logits(self, resid: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead vocab"]:
        """Full-vocabulary float32 logits of ``resid``. Memory grows with ``lead x vocab``: use it for a
        few rows, and ``statistics`` for a whole stack."""
        self.check_width(resid)
        normed = readout.apply_final_norm(resid, self.norm_kind, self.norm_weight, self.norm_bias, self.norm_eps)
        return readout.unembed(normed, self.W_U, self.b_U, self.softcap)

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
                resid, self.norm_kind, self.norm_weight, self.norm_bias, self.norm_eps, self.W_U, self.b_U,
                self.softcap, top_k, target_ids, vocab_chunk=vocab_chunk, token_chunk=token_chunk,
                reductions=tuple(reductions), precision=precision,
            )

    def tensors(self) -> dict:
        """The decoder as the keyword arguments of ``core.readout.lens_statistics`` (what the core takes)."""
        return {"norm_kind": self.norm_kind, "norm_weight": self.norm_weight, "norm_bias": self.norm_bias,
                "norm_eps": self.norm_eps, "W_U": self.W_U, "b_U": self.b_U, "softcap": self.softcap}

    def check_width(self, resid: Tensor) -> None:
        if resid.shape[-1] != self.d_model:
            raise LensValueError(
                f"residual vectors have width {resid.shape[-1]} but this decoder's W_U expects d_model="
                f"{self.d_model}: the activations come from a different model than the one decoding them"
            )

__all__ = ["NormKind", "Decoder"]
