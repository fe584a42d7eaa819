"""Sublayer substitution on nnsight models, locally or on NDIF: ``lp.nnsight.run_substitution``, one trace of
``1 + m`` copies of the prompt running ``core/trace/substitution.substitution_effect`` (the same numbers as
``lp.transformer_lens.run_substitution``)."""

from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins.backends._common import eval_mode, one_at_a_time, unwrap
from lens_plugins.backends.nnsight._run import remote_error
from lens_plugins.core.trace.substitution import substitution_effect
from lens_plugins.typecheck import typechecked


@one_at_a_time
@typechecked
def run_substitution(model, tokens: Int[Tensor, "1 seq"], plan: list[tuple[int, str]],
                     weight: Float[Tensor, "m d_model d_model"], bias: Float[Tensor, "m d_model"], *,
                     remote: Union[bool, str] = False, backend=None, paths: Optional[dict] = None) -> dict:
    """As ``lp.transformer_lens.run_substitution``; ``remote`` / ``backend`` go to the trace."""
    trace_kwargs = {"remote": remote} if backend is None else {"backend": backend}
    try:
        with eval_mode(unwrap(model)), torch.no_grad():
            with model.trace(tokens.expand(1 + len(plan), -1), **trace_kwargs):
                saved = substitution_effect(model, [tuple(p) for p in plan], weight, bias, paths)
    except Exception as error:  # noqa: BLE001 - re-raised with what happened if it is a remote failure
        raise remote_error(error, remote, backend) from error
    return {"top1": saved["top1"], "kl": saved["kl"]}

__all__ = ["run_substitution"]
