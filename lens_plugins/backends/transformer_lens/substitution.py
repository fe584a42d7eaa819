"""Sublayer substitution on TransformerLens models: ``lp.transformer_lens.run_substitution``, the model's final
top-1 with one sublayer's contribution replaced by its linear shortcut, as ``core/trace/substitution.py``
computes it in an nnsight trace.

``1 + m`` copies of the prompt run in one ``run_with_hooks``: copy 0 clean, copy ``i + 1`` with substitution
``i``: a hook on the sublayer's input residual (``hook_resid_pre`` / ``hook_resid_mid``) keeps it, a hook on its
write (``hook_attn_out`` / ``hook_mlp_out``) replaces positions 1 onwards by the shortcut of it.
"""

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins.backends._common import eval_mode, one_at_a_time
from lens_plugins.backends.transformer_lens import reader as tla
from lens_plugins.backends.transformer_lens.verification import decoder_for
from lens_plugins.core.rows import Row
from lens_plugins.core.substitution import READ_SITES, WRITE_HOOKS, final_top1_and_kl, shortcut
from lens_plugins.typecheck import typechecked


@one_at_a_time
@typechecked
def run_substitution(model, tokens: Int[Tensor, "1 seq"], plan: list[tuple[int, str]],
                     weight: Float[Tensor, "m d_model d_model"], bias: Float[Tensor, "m d_model"]) -> dict:
    """``{"top1": [1 + m, seq] (copy 0 clean), "kl": [m, seq] KL(final clean || final substituted)}`` of
    ``model`` on ``tokens``, copy ``i + 1`` with sublayer ``plan[i] = (layer, "attn" | "mlp")``'s contribution
    replaced by ``x @ weight[i].T + bias[i]`` of its input residual ``x``, every position but the first."""
    decoder_for(model, sublayers=True)  # a model whose sublayer hooks do not add up is refused first
    parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))
    inputs = {}
    hooks = []

    def keep(name):
        def hook(act, hook):
            inputs[name] = act.detach().clone()
        return hook

    def write(i, name):
        def hook(act, hook):
            act[i + 1, 1:] = shortcut(inputs[name][i + 1, 1:], weight[i], bias[i])
            return act
        return hook

    for i, (layer, sublayer) in enumerate(plan):
        site = "pre" if parallel else READ_SITES[sublayer]
        read = tla.hook_name(Row(layer, site))
        if read not in inputs:
            inputs[read] = None
            hooks.append((read, keep(read)))
        hooks.append((tla.hook_name(Row(layer, WRITE_HOOKS[sublayer])), write(i, read)))
    with eval_mode(model), torch.no_grad():
        logits = model.run_with_hooks(tokens.to(model.cfg.device).expand(1 + len(plan), -1), fwd_hooks=hooks)
    top1, kl = final_top1_and_kl(logits)
    return {"top1": top1.cpu(), "kl": kl.cpu()}

__all__ = ["run_substitution"]
