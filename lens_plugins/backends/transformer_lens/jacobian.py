"""The Jacobian lens on TransformerLens: block outputs for the fit, and a lens ``Edit`` as forward hooks.

The lens's matrices act on raw Hugging Face activations (as the published lenses and TransformerLens's own
``JacobianLens`` do), so a bridge in compatibility mode, or one whose weights were processed (folded norms,
centred writes: another residual basis), is refused rather than fitted or edited in the wrong basis.
"""

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from lens_plugins.backends._common import one_at_a_time
from lens_plugins.backends.transformer_lens.reader import hook_name, tokenize
from lens_plugins.core import jacobian as core_jacobian
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.rows import Row
from lens_plugins.lenses.jacobian import Edit
from lens_plugins.methods.jacobian import EditResult, edit_result


def check_raw(model) -> None:
    """Refuse a model whose residual stream is not the raw Hugging Face one the lens's matrices act on."""
    if getattr(model, "compatibility_mode", False) or getattr(model, "_weights_processed", False):
        raise LensValueError(
            "this TransformerBridge is in compatibility mode or its weights were processed (folded norms, centred "
            "writes), which changes the residual basis the Jacobian lens's matrices act on: use a freshly booted "
            "TransformerBridge.boot_transformers(...) model (raw weights)")
    if not hasattr(model, "original_model") and not hasattr(model, "adapter"):
        raise LensValueError("the Jacobian lens acts on raw Hugging Face activations; a HookedTransformer folds and "
                             "centres its weights: use a TransformerBridge, or the nnsight backend")


def block_outputs(model, ids: Tensor, layers: list[int], mid_layers: Sequence[int] = ()) -> list[Tensor]:
    """The outputs of blocks ``layers`` for ``ids [1, seq]`` on one autograd graph rooted at the earliest (that
    hook's activation is made to require grad; parameters are frozen by the caller), then the ``mid`` residual
    (``hook_resid_mid``) of blocks ``mid_layers``; the root is the earliest point in stream order."""
    points = [Row(layer, "post") for layer in layers] + [Row(layer, "mid") for layer in mid_layers]
    ordered = sorted(set(points), key=lambda row: (row.layer, row.site == "post"))
    names = list(dict.fromkeys(hook_name(row) for row in ordered))
    captured: dict[str, Tensor] = {}

    def keep(name):
        def hook(activation, hook):
            if name == names[0] and not activation.requires_grad:
                activation.requires_grad_(True)
            captured[name] = activation
            return activation
        return hook

    with torch.enable_grad(), model.hooks(fwd_hooks=[(name, keep(name)) for name in names]):
        model(ids.to(model.cfg.device), return_type=None)
    return [captured[hook_name(row)] for row in points]


def jacobian_hooks(edit: Edit) -> list[tuple[str, object]]:
    """``[(hook_name, fn), ...]`` that apply ``edit`` at its block outputs, for ``model.hooks(fwd_hooks=...)`` or
    ``model.run_with_hooks(..., fwd_hooks=...)``."""
    def hook_for(spec):
        def hook(activation, hook):
            return core_jacobian.edit(activation, spec)
        return hook

    return [(hook_name(Row(layer, "post")), hook_for(edit.specs[layer])) for layer in edit.layers]


@one_at_a_time
def run_jacobian_edit(model, prompt: Union[str, list[str]], edit: Edit, *, prepend_bos: Optional[bool] = None) -> EditResult:
    """Run ``prompt`` with and without ``edit`` and return what it did to the model's output distribution (at
    the last position of each prompt): the edited tokens' probabilities before and after, the KL and the top
    tokens."""
    check_raw(model)
    tokens, mask = tokenize(model, prompt, "left", prepend_bos)
    with torch.no_grad():
        clean = model(tokens, attention_mask=mask)[:, -1]
        with model.hooks(fwd_hooks=jacobian_hooks(edit)):
            edited = model(tokens, attention_mask=mask)[:, -1]
    return edit_result(edit, clean, edited, model.tokenizer)

__all__ = ["check_raw", "block_outputs", "jacobian_hooks", "run_jacobian_edit"]
