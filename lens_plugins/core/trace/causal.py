"""Subspace ablation inside an nnsight trace (locally or on an NDIF server): the model's own response to
mean-ablating a basis at one residual row (``core.causal_basis``).

The trace runs two copies of one prompt: copy 0 clean, copy 1 with the basis mean-ablated at the row, at every
position but the first (the attention sink, whose outsized state no mean stands for). What comes back is the
clean state at the row and the per-position KL of the model's final distribution, clean to ablated, computed
where the model runs. Torch only, no decorators: ships by source.
"""

from lens_plugins.core.architectures import decoder_tensors, get_path, layer_input, layer_output
from lens_plugins.core.causal_basis import ablate, kl
from lens_plugins.core.patching import patch_row
from lens_plugins.core.verification import resolve

FORMAT = "lens_plugins.ablation/1"


def ablation_effect(model, label, basis, mean, paths=None):
    """In a trace over two copies of one prompt: mean-ablate ``basis [k, d]`` (around ``mean [d]``) at row
    ``label`` ("embed", "3_pre", "29_post") of copy 1, positions 1 onwards; save the clean row ``[seq, d]``
    and ``KL(final clean || final ablated)`` per position ``[seq]`` (soft-capped logits, as the model's)."""
    import nnsight
    import torch

    spec = resolve(model, paths)
    row = patch_row(label)
    block = get_path(model, spec["layers"])[row.layer]
    hidden = layer_output(block.output) if row.site == "post" else layer_input(block.inputs)
    clean = hidden[0].detach().clone()
    hidden[1, 1:] = ablate(hidden[1, 1:], basis, mean)
    logits = get_path(model, spec["lm_head"]).output.float()
    softcap = decoder_tensors(model, spec).softcap
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logprobs = logits.log_softmax(-1)
    return nnsight.save({"format": FORMAT, "hidden": clean.float().cpu(),
                         "effect": kl(logprobs[0], logprobs[1]).detach().cpu()})

__all__ = ["FORMAT", "ablation_effect"]
