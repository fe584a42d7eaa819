"""The two backends and the one place that tells them apart.

``of(model)`` returns the backend package of a model (``lp.transformer_lens`` for a TransformerLens model or
cache, ``lp.nnsight`` for an nnsight-wrapped one): a backend-free driver asks it once instead of testing
attributes. ``_common`` holds the one-call guards both share; ``hf`` reads rows of a plain Hugging Face
model (training, Future Lens, verification).
"""

import importlib

from lens_plugins.core.errors import LensTypeError


def kind(model) -> str:
    """``"transformer_lens"`` or ``"nnsight"``: which backend runs ``model`` (a model, or a TransformerLens
    ``ActivationCache``), by the type's defining package rather than by its attributes."""
    for cls in type(model).__mro__:
        root = cls.__module__.split(".")[0]
        if root == "transformer_lens":
            return "transformer_lens"
        if root == "nnsight":
            return "nnsight"
    raise LensTypeError(
        f"expected a TransformerLens model (TransformerBridge / HookedTransformer) or an nnsight model, got "
        f"{type(model).__name__}; wrap a Hugging Face model with lp.nnsight.wrap_model(model, tokenizer)")


def of(model):
    """The backend package (``lens_plugins.backends.transformer_lens`` or ``.nnsight``) that runs ``model``."""
    return importlib.import_module(f"lens_plugins.backends.{kind(model)}")


__all__ = ["kind", "of"]
