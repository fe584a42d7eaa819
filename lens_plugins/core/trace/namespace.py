"""What ``lens_plugins`` (``lp``) is inside a trace body on an NDIF server: the in-trace entry points only.

A remote trace ships the globals its body names; ``lp.nnsight.logit_lens(model)`` names ``lp``, which the
server cannot import, so ``lp`` pickles as ``server_namespace()`` (see ``lens_plugins._Package``). This is the
one leaf that names every in-trace method: the method modules import the reader, never each other or this
module (nnsight pickles a shipped module as a copy of its namespace; two modules naming each other would
recurse forever).
"""

import types

from lens_plugins.core.trace import (activation_patching, attention, attribution, causal, decoder_lens, dola, generation,
                                       jacobian, lens, patchscope, substitution)


def server_namespace():
    """``lp`` on the server: ``lp.nnsight.<verb>`` for every in-trace verb of ``lp.nnsight``."""
    return types.SimpleNamespace(nnsight=types.SimpleNamespace(
        logit_lens=lens.logit_lens, logit_diff=lens.logit_diff, attribution=attribution.attribution,
        generation_lens=generation.generation_lens, dola=dola.dola, decoder_lens=decoder_lens.decoder_lens,
        attention=attention.attention, read_source=patchscope.read_source,
        patch_and_read=patchscope.patch_and_read, patch_and_next_token=patchscope.patch_and_next_token,
        jacobian_edit=jacobian.jacobian_edit, edited_logits=jacobian.edited_logits,
        ablation_effect=causal.ablation_effect, substitution_effect=substitution.substitution_effect,
        patch_and_measure=activation_patching.patch_and_measure))

__all__ = ["server_namespace"]
