"""The TransformerLens backend (``lp.transformer_lens``): every verb on ``TransformerBridge`` (TransformerLens
4.x) and ``HookedTransformer`` (3.9) models and their ``ActivationCache``.

One grammar on both backends: ``run_<method>(model, prompt, ...)`` runs the model and returns a result;
``<method>(cache, ...)`` works on a cache you already have (``cache.lens.<method>`` is the same). The same
verbs, parameters and defaults are in ``lp.nnsight``. One module per method, the same names as nnsight's.
"""

from lens_plugins._aliases import deprecated_names
from lens_plugins.backends.transformer_lens.accessor import CacheLens, register_accessor
from lens_plugins.backends.transformer_lens.activation_patching import run_patching
from lens_plugins.backends.transformer_lens.attention import attention, attention_hook_filter, run_attention
from lens_plugins.backends.transformer_lens.attribution import (
    attribution,
    cache_parts,
    logit_diff,
    run_attribution,
    run_logit_diff,
)
from lens_plugins.backends.transformer_lens.decoder_lens import run_decoder_lens
from lens_plugins.backends.transformer_lens.dola import run_dola
from lens_plugins.backends.transformer_lens.generation import run_generation_lens
from lens_plugins.backends.transformer_lens.jacobian import jacobian_hooks, run_jacobian_edit
from lens_plugins.backends.transformer_lens.lens import logit_lens, run_logit_lens
from lens_plugins.backends.transformer_lens.patchscope import run_patchscope
from lens_plugins.backends.transformer_lens.causal_checks import run_ablation
from lens_plugins.backends.transformer_lens.substitution import run_substitution
from lens_plugins.backends.transformer_lens.verification import decoder_for
from lens_plugins.backends.transformer_lens.reader import (
    hook_filter,
    hook_name,
    reader,
    recover_tokens,
    residual_stack,
    row_plan,
)

__all__ = [
    "logit_lens", "run_logit_lens", "logit_diff", "run_logit_diff", "attribution", "run_attribution",
    "cache_parts", "run_generation_lens", "run_dola", "run_decoder_lens", "run_patchscope", "attention",
    "attention_hook_filter", "run_attention", "decoder_for", "hook_filter", "hook_name", "reader",
    "recover_tokens", "residual_stack", "row_plan", "CacheLens", "register_accessor", "jacobian_hooks",
    "run_jacobian_edit", "run_ablation", "run_substitution", "run_patching",
]

__getattr__ = deprecated_names(__name__, {
    "dola_generate": ("lens_plugins.backends.transformer_lens", "run_dola"),
    "patchscope": ("lens_plugins.backends.transformer_lens", "run_patchscope"),
})
