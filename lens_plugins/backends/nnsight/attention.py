"""Attention patterns inside nnsight traces, locally or on NDIF: the in-trace ``attention(model)``
(``core/trace/attention.py``, shipped by source), its labelling ``attention_result`` and the one-call
``run_attention``. Only ``attn_implementation="eager"`` forms the patterns: the trace switches the model to it
for the forward it reads, whatever implementation it was loaded with (here or on the server)."""

from typing import Optional, Union

from lens_plugins.backends._common import Prompt, one_at_a_time
from lens_plugins.backends.nnsight._run import RemoteJob, run
from lens_plugins.core.errors import LensTypeError
from lens_plugins.core.trace import attention as trace_attention
from lens_plugins.core.trace.attention import attention
from lens_plugins.methods.attention import AttentionResult
from lens_plugins.methods.attention import attention_result as result_of
from lens_plugins.typecheck import typechecked


@typechecked
def attention_result(saved: dict, model) -> AttentionResult:
    """The ``AttentionResult`` of what ``attention(model)`` saved inside a trace of ``model``."""
    if not isinstance(saved, dict) or saved.get("format") != trace_attention.FORMAT:
        raise LensTypeError(f"expected what lp.nnsight.attention(model) returned inside a trace, got {type(saved).__name__}")
    return result_of(saved["layers"], saved["patterns"], saved["token_ids"], saved["attention_mask"], model.tokenizer)


@one_at_a_time
@typechecked
def run_attention(
    model,
    prompt: Prompt,
    layers: Optional[list[int]] = None,
    *,
    remote: Union[bool, str] = False,
    backend=None,
    padding_side: Optional[str] = None,
    prepend_bos: Optional[bool] = None,
    blocking: bool = True,
) -> Union[AttentionResult, RemoteJob]:
    """Trace ``model`` on ``prompt`` and return its attention patterns: the one-call form, locally or on an
    NDIF server (the patterns are ``O(layers x heads x seq^2)`` numbers: choose ``layers`` for a long prompt),
    with ``run_logit_lens``'s guards, ``prepend_bos`` and remote errors; ``blocking=False`` (with ``remote=True``)
    returns a ``RemoteJob`` at once (``result()``: this ``AttentionResult``)."""
    return run(model, prompt, remote, backend, lambda: attention(model, layers),
               lambda saved: attention_result(saved, model), blocking, padding_side, prepend_bos)

__all__ = ["attention_result", "run_attention"]
