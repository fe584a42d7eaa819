"""Sublayer substitution inside an nnsight trace (locally or on an NDIF server): the model's final top-1 when
one sublayer's contribution is replaced by its least-squares shortcut (``core.substitution``).

The trace runs ``1 + m`` copies of one prompt: copy 0 clean, copy ``i + 1`` with substitution ``i`` (a block
and a sublayer) written into that sublayer's output at every position but the first (the attention sink,
whose outsized state the fit leaves out). The shortcut reads the copy's own running input residual (block
input for the attention; block input plus the attention's write for the MLP, or the block input in a parallel
block), so later layers see its contribution. What comes back is each copy's final top-1 and the per-position
KL of the final distribution, clean to substituted, computed where the model runs. Torch only, no decorators:
ships by source.
"""

from lens_plugins.core.architectures import decoder_tensors, get_path, is_parallel, layer_input, layer_output
from lens_plugins.core.dla import check_sublayer_writes
from lens_plugins.core.substitution import final_top1_and_kl, shortcut
from lens_plugins.core.verification import resolve

FORMAT = "lens_plugins.substitution/1"


def substitution_effect(model, plan, weight, bias, paths=None):
    """In a trace over ``1 + len(plan)`` copies of one prompt: for each ``(layer, sublayer)`` of ``plan``
    (``sublayer`` "attn" or "mlp"), replace that sublayer's contribution in copy ``i + 1``, positions 1
    onwards, by ``x @ weight[i].T + bias[i]`` of its input residual ``x``; save ``top1 [1 + m, seq]`` (copy 0
    clean) and ``kl [m, seq]``, ``KL(final clean || final substituted)`` (soft-capped logits, as the
    model's)."""
    import nnsight

    spec = resolve(model, paths)
    check_sublayer_writes(spec)
    blocks = get_path(model, spec["layers"])
    parallel = is_parallel(model, spec)
    by_layer = {}
    for i, (layer, sublayer) in enumerate(plan):
        by_layer.setdefault(int(layer), []).append((i, sublayer))
    for layer in sorted(by_layer):  # forward order: a block's input, its attention, its MLP
        block = blocks[layer]
        todo = by_layer[layer]
        x = layer_input(block.inputs)
        shape = x.shape
        attn_copies = [i for i, s in todo if s == "attn"]
        mlp_copies = [i for i, s in todo if s == "mlp"]
        if attn_copies or (mlp_copies and not parallel):
            attn = layer_output(get_path(block, spec.get("attn_out", spec["attn"])).output).view(shape)
            for i in attn_copies:
                attn[i + 1, 1:] = shortcut(x[i + 1, 1:], weight[i], bias[i])
        if mlp_copies:
            mid = x if parallel else x + attn
            mlp = layer_output(get_path(block, spec.get("mlp_out", spec["mlp"])).output).view(shape)
            for i in mlp_copies:
                mlp[i + 1, 1:] = shortcut(mid[i + 1, 1:], weight[i], bias[i])
    logits = get_path(model, spec["lm_head"]).output
    top1, kl = final_top1_and_kl(logits, decoder_tensors(model, spec).softcap)
    return nnsight.save({"format": FORMAT, "top1": top1.detach().cpu(), "kl": kl.detach().cpu()})

__all__ = ["FORMAT", "substitution_effect"]
