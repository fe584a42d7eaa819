"""The nnsight backend (``lp.nnsight``): every verb on Hugging Face models wrapped by nnsight, locally or on
an NDIF server (``remote=True``).

One grammar on both backends: ``run_<method>(model, prompt, ...)`` traces the model and returns a result;
``<method>(model, ...)`` is called inside your own ``with model.trace(...)`` (its code is in
``lens_plugins/core/trace/`` and ships to a server by source) and ``<method>_result(saved, model)`` labels
what it saved. The same verbs, parameters and defaults are in ``lp.transformer_lens``. Importing this package
registers ``lens_plugins.core`` with ``nnsight.register`` (``_run``).
"""

from lens_plugins._aliases import deprecated_names
from lens_plugins.backends.nnsight._run import SHIPPED_MODULES
from lens_plugins.backends.nnsight.activation_patching import run_patching
from lens_plugins.backends.nnsight.attention import attention, attention_result, run_attention
from lens_plugins.backends.nnsight.attribution import (
    attribution,
    attribution_result,
    logit_diff,
    logit_diff_result,
    run_attribution,
    run_logit_diff,
)
from lens_plugins.backends.nnsight.decoder_lens import decoder_lens, decoder_lens_result, run_decoder_lens
from lens_plugins.backends.nnsight.dola import dola, dola_result, run_dola
from lens_plugins.backends.nnsight.generation import generation_lens, generation_result, run_generation_lens
from lens_plugins.backends.nnsight.jacobian import jacobian_edit, run_jacobian_edit
from lens_plugins.backends.nnsight.lens import logit_lens, logit_lens_result, run_logit_lens
from lens_plugins.backends.nnsight.patchscope import run_patchscope
from lens_plugins.backends.nnsight.causal_checks import run_ablation
from lens_plugins.backends.nnsight.substitution import run_substitution
from lens_plugins.backends.nnsight.reader import decoder_for, lens_tensors, remote_model, wrap_model
from lens_plugins.core.errors import RemoteLensError

__all__ = [
    "logit_lens", "logit_lens_result", "run_logit_lens", "logit_diff", "logit_diff_result", "run_logit_diff",
    "attribution", "attribution_result", "run_attribution", "generation_lens", "generation_result",
    "run_generation_lens", "dola", "dola_result", "run_dola", "decoder_lens", "decoder_lens_result",
    "run_decoder_lens", "run_patchscope", "attention", "attention_result", "run_attention", "decoder_for",
    "lens_tensors", "remote_model", "wrap_model", "RemoteLensError", "SHIPPED_MODULES", "jacobian_edit",
    "run_jacobian_edit", "run_ablation", "run_substitution", "run_patching",
]

__getattr__ = deprecated_names(__name__, {
    "result": ("lens_plugins.backends.nnsight", "logit_lens_result"),
    "dola_generate": ("lens_plugins.backends.nnsight", "run_dola"),
    "dola_output": ("lens_plugins.backends.nnsight", "dola_result"),
    "patchscope": ("lens_plugins.backends.nnsight", "run_patchscope"),
})
