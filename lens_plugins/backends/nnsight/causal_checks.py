"""Subspace ablation on nnsight models, locally or on NDIF: ``lp.nnsight.run_ablation``, one trace of two
copies of the prompt running ``core/trace/causal.ablation_effect`` (the same numbers as
``lp.transformer_lens.run_ablation``)."""

from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins.backends._common import eval_mode, one_at_a_time, unwrap
from lens_plugins.backends.nnsight._run import remote_error
from lens_plugins.core.trace.causal import ablation_effect
from lens_plugins.typecheck import typechecked


@one_at_a_time
@typechecked
def run_ablation(model, tokens: Int[Tensor, "1 seq"], label: str, basis: Float[Tensor, "k d_model"],
                 mean: Float[Tensor, " d_model"], *, remote: Union[bool, str] = False, backend=None,
                 paths: Optional[dict] = None) -> dict:
    """As ``lp.transformer_lens.run_ablation``; ``remote`` / ``backend`` go to the trace."""
    trace_kwargs = {"remote": remote} if backend is None else {"backend": backend}
    try:
        with eval_mode(unwrap(model)), torch.no_grad():
            with model.trace(tokens.expand(2, -1), **trace_kwargs):
                saved = ablation_effect(model, label, basis, mean, paths)
    except Exception as error:  # noqa: BLE001 - re-raised with what happened if it is a remote failure
        raise remote_error(error, remote, backend) from error
    return {"hidden": saved["hidden"], "effect": saved["effect"]}

__all__ = ["run_ablation"]
