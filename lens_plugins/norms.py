"""Reading a model's final norm as plain tensors (kind, weight, bias, eps).

The lens applies the final norm itself, in float32, to every row of the residual stack; so it needs the
norm's parameters, not the module. Hugging Face norms are recognised by class, from a table rather than
an ``isinstance`` ladder, so that a new family is one line here.
"""

from typing import Optional

import torch
from torch import Tensor

from lens_plugins.decoder import NormKind

# Norm classes that scale by (1 + weight) instead of weight.
ONE_PLUS_WEIGHT_NORMS = {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm", "Gemma3nRMSNorm"}


class UnknownNormError(TypeError):
    pass


def hf_norm_params(module: torch.nn.Module) -> tuple[NormKind, Optional[Tensor], Optional[Tensor], float]:
    """``(kind, weight, bias, eps)`` of a Hugging Face final-norm module; ``weight`` already includes
    Gemma's ``+ 1``."""
    name = type(module).__name__
    if isinstance(module, torch.nn.LayerNorm) or name in ("LayerNorm", "OlmoLayerNorm"):
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5))
        return "layernorm", _detached(weight), _detached(bias), float(eps)
    if name.endswith("RMSNorm"):
        weight = _detached(getattr(module, "weight", None))
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None:
            raise UnknownNormError(f"{name} has neither `variance_epsilon` nor `eps`; pass the final norm by hand")
        if weight is not None and name in ONE_PLUS_WEIGHT_NORMS:
            weight = 1.0 + weight.float()
        return "rmsnorm", weight, None, float(eps)
    raise UnknownNormError(
        f"lens_plugins does not know the final norm class {name!r}. Build the decoder by hand: "
        "lens_plugins.Decoder(norm_kind='rmsnorm' | 'layernorm' | 'none', W_U=..., norm_weight=..., "
        "norm_bias=..., norm_eps=...)"
    )


def _detached(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()
