"""Direct logit attribution inside an nnsight trace (locally or on an NDIF server): the stream's parts at one
position read in forward order (``collect``) and attributed by ``core.dla``; only the attributions are saved."""

import torch

from lens_plugins.core import dla, request
from lens_plugins.core.architectures import (
    decoder_tensors,
    get_path,
    is_parallel,
    layer_input,
    layer_output,
    norm_params,
)
from lens_plugins.core.defaults import TOP_NEURONS
from lens_plugins.core.verification import resolve
from lens_plugins.core.pipeline import check_decoder
from lens_plugins.core.trace.reader import model_input, out_of_order

ATTRIBUTION_FORMAT = "lens_plugins.attribution/1"


def attribution(model, target, distractor=None, position=-1, paths=None, neurons=False, top_neurons=TOP_NEURONS,
                effects=0):
    """Direct logit attribution at ``position`` of this invoke's prompts, called inside the trace.

    ``target`` / ``distractor`` are single-token strings or ids, or lists of them (token sets, see
    ``dla.member_coefficients``); no distractor attributes the target logit alone. Saves only the attributions
    (``O(layers x heads)`` numbers per prompt): the model's weights and activations stay where the model
    runs. Reads layer 0's input first, so call it before anything later in its block (as ``logit_lens``).
    Turn it into an ``Attribution`` after the trace with ``lp.nnsight.attribution_result(saved, model)``.
    ``neurons=True`` also splits every MLP into its neurons (the ``top_neurons`` largest are saved, and every
    layer's neuron sum); ``effects=k`` saves the ``k`` tokens each write promotes and suppresses most
    (``dla.write_effects``): both computed here, where the weights are.
    """
    import nnsight
    from nnsight.intervention.interleaver import OutOfOrderError

    spec = resolve(model, paths)
    dla.check_supported(spec)
    dla.check_neurons(spec if neurons else None, top_neurons, effects)
    decoder = decoder_tensors(model, spec)
    check_decoder(decoder)
    d_vocab = decoder.d_vocab
    target_ids = request.token_set_ids(model.tokenizer, target, d_vocab)
    distractor_ids = [] if distractor is None else request.token_set_ids(model.tokenizer, distractor, d_vocab, "distractor")
    try:
        _, mask = model_input(model)
        dla.check_position(position, mask)
        parts = collect(model, spec, position, neurons)
    except OutOfOrderError as error:
        raise out_of_order(error) from error
    read = parts.pop("neurons")
    with torch.no_grad():
        out = dla.attribute({k: v.detach() if v is not None else None for k, v in parts.items()}, decoder,
                            target_ids, distractor_ids, read, top_neurons, effects)
    return nnsight.save({
        "format": ATTRIBUTION_FORMAT,
        "values": {name: value.detach().cpu() for name, value in out.items()},
        "parallel": is_parallel(model, spec),
        "position": position,
        "target_ids": list(target_ids),
        "distractor_ids": list(distractor_ids),
    })


def collect(model, spec, position, neurons=False):
    """Everything the stream holds at ``position``, read inside the trace in forward order: positional
    embeddings, layer 0's input, then per layer the output projection's input (the heads), what attention
    added, the MLP's neuron activations (``neurons``: the input of its output projection, with that
    projection's weight rows and bias), what the MLP added, and the last layer's output: the ``parts`` of
    ``dla.attribute``, and under ``"neurons"`` its ``neurons`` (``None`` unless asked)."""
    blocks = get_path(model, spec["layers"])
    n_heads = dla.head_count(model)
    pos_path = spec.get("pos_embed")
    pos_embed = get_path(model, pos_path).output[:, position].float() if pos_path else None
    embed, heads, head_bias, attn, mlp, read = None, [], [], [], [], []
    one_plus = spec.get("norm_one_plus")  # not in the spec: by class name
    for layer in range(len(blocks)):
        block = blocks[layer]
        resid = layer_input(block.inputs)
        if layer == 0:
            embed = resid[:, position].float() if pos_embed is None else resid[:, position].float() - pos_embed
        post_norm = norm_params(get_path(block, spec["attn_out"]), one_plus) if spec.get("post_norms") else None
        o_proj = get_path(block, spec["o_proj"])
        h, b = dla.split_heads(_at(o_proj.input, resid, position), o_proj, n_heads, post_norm)
        heads.append(h)
        head_bias.append(b)
        attn.append(_at(layer_output(get_path(block, spec.get("attn_out", spec["attn"])).output), resid, position))
        if neurons:
            out_proj = get_path(block, spec["neuron_out"])
            W_out, b_out = dla.output_projection(out_proj)
            read.append((_at(out_proj.input, resid, position).detach(), W_out.detach(),
                         None if b_out is None else b_out.detach()))
        mlp.append(_at(layer_output(get_path(block, spec.get("mlp_out", spec["mlp"])).output), resid, position))
    final = layer_output(blocks[len(blocks) - 1].output)[:, position].float()
    return {
        "embed": embed, "pos_embed": pos_embed, "heads": _stack(heads, 1), "head_bias": _stack(head_bias, 1),
        "attn": _stack(attn, 1), "mlp": _stack(mlp, 1), "final": final, "neurons": read if neurons else None,
    }


def _stack(tensors, dim):
    """``torch.stack`` of per-layer tensors that may live on different GPUs (a model split across devices)."""
    return torch.stack([t.to(tensors[0].device) for t in tensors], dim)


def _at(x, resid, position):
    """``x`` at ``position``, ``[batch, width]``; OPT flattens ``[batch * seq, d]`` around its MLP, so ``x`` is
    first given the ``[batch, seq]`` lead of the layer's residual input."""
    return x.reshape(*resid.shape[:2], -1)[:, position].float()

__all__ = ["ATTRIBUTION_FORMAT", "attribution", "collect"]
