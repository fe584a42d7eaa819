"""Subspace ablation on TransformerLens models: ``lp.transformer_lens.run_ablation``, the model's own response
to mean-ablating a basis at one residual row, as ``core/trace/causal.py`` computes it in an nnsight trace.

Two copies of the prompt run in one ``run_with_hooks`` (copy 1 ablated at the row's hook, positions 1
onwards), so both backends run the same shapes and give the same numbers.
"""

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins.backends._common import eval_mode, one_at_a_time
from lens_plugins.backends.transformer_lens import reader as tla
from lens_plugins.core.causal_basis import ablate, kl
from lens_plugins.core.patching import patch_row
from lens_plugins.typecheck import typechecked


@one_at_a_time
@typechecked
def run_ablation(model, tokens: Int[Tensor, "1 seq"], label: str, basis: Float[Tensor, "k d_model"],
                 mean: Float[Tensor, " d_model"]) -> dict:
    """``{"hidden": [seq, d] clean state at row label, "effect": [seq] KL(final clean || final ablated)}`` of
    ``model`` on ``tokens`` with ``basis`` mean-ablated around ``mean`` at row ``label`` ("embed", "3_pre",
    "29_post"), every position but the first."""
    captured = {}

    def hook(act, hook):
        captured["hidden"] = act[0].detach().clone()
        act[1, 1:] = ablate(act[1, 1:], basis, mean)
        return act

    with eval_mode(model), torch.no_grad():
        logits = model.run_with_hooks(tokens.to(model.cfg.device).expand(2, -1),
                                      fwd_hooks=[(tla.hook_name(patch_row(label)), hook)])
    logprobs = logits.float().log_softmax(-1)
    return {"hidden": captured["hidden"].float().cpu(), "effect": kl(logprobs[0], logprobs[1]).cpu()}

__all__ = ["run_ablation"]
