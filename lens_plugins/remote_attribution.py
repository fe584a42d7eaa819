"""Direct logit attribution, the part that runs where the activations live.

A logit is ``softcap(norm(x) . u + b_U)`` with ``x`` the final residual, which is a sum of what every
embedding, attention head, MLP and bias wrote into the stream. The final norm divides by ``x``'s scale, so
the logit is not linear in those writes; at the scale ``x`` really had on this forward pass it is. Freezing
that scale (and folding the norm's weight, Gemma's ``1 + w`` included, into the direction) gives the
standard direct logit attribution: each write dotted with one direction, plus a constant for the norm's
bias and ``b_U``, summing exactly to the pre-soft-cap logit (or logit difference) of the real pass.

Everything here is torch-only, undecorated and returns plain dicts, like ``readout``: the same functions
run on a TransformerLens cache on the caller's machine and inside an nnsight trace on an NDIF server
(``attribution`` below, shipped by source), so both backends share one piece of arithmetic.
"""

import torch

from lens_plugins.architectures import (
    decoder_tensors, get_path, is_parallel, layer_input, layer_output, norm_params, resolve,
)
from lens_plugins.readout import apply_final_norm

FORMAT = "lens_plugins.attribution/1"  # marks a saved attribution, so the local side can refuse anything else


def norm_scale(x, norm_kind, norm_eps):
    """The per-vector factor a norm divides by, ``[..., 1]``: the quantity DLA freezes."""
    x = x.float()
    if norm_kind == "none":
        return torch.ones_like(x[..., :1])
    if norm_kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps)


def frozen_norm(parts, raw, norm_kind, norm_weight, norm_eps):
    """``parts [..., n, d]`` (summing to ``raw [..., d]``) mapped through a norm whose scale is frozen at
    ``raw``'s: linear, so the mapped parts sum to ``norm(raw)`` minus the norm's bias."""
    parts = parts.float()
    if norm_kind == "layernorm":
        parts = parts - parts.mean(-1, keepdim=True)
    parts = parts * norm_scale(raw, norm_kind, norm_eps).unsqueeze(-2)
    return parts if norm_weight is None else parts * norm_weight.float()


def member_coefficients(final, decoder, target_ids, distractor_ids):
    """``coef [batch, members]``: each target token's share of the target set's probability at the real
    forward pass, and minus each distractor's share of the distractor set's (one token: +1 / -1).

    The weighted member logit is what a token set's attribution explains: it is linear in the residual, and
    at the frozen point its gradient equals that of the set's log-probability (the log-sum-exp direction).
    """
    ids = torch.tensor(list(target_ids) + list(distractor_ids), dtype=torch.long, device=decoder["W_U"].device)
    logits = member_logits(final, decoder, ids, capped=True)
    n = len(target_ids)
    coef = torch.cat([logits[:, :n].softmax(-1), -logits[:, n:].softmax(-1)], dim=-1)
    return ids, coef


def member_logits(final, decoder, ids, capped):
    """The logits of ``ids`` at the final residual, before or after the soft-cap: d_model dot products."""
    normed = apply_final_norm(final, decoder["norm_kind"], decoder["norm_weight"], decoder["norm_bias"], decoder["norm_eps"])
    columns = decoder["W_U"][:, ids].float()
    logits = normed @ columns
    if decoder["b_U"] is not None:
        logits = logits + decoder["b_U"][ids].float()
    if capped and decoder["softcap"] is not None:
        logits = decoder["softcap"] * torch.tanh(logits / decoder["softcap"])
    return logits


def direction(final, decoder, ids, coef):
    """``(direction [batch, d_model], constant [batch])`` with ``explained = component . direction`` summed
    plus ``constant``: the unembedding columns weighted by ``coef``, times the final norm's weight and its
    frozen scale, centred for a LayerNorm (centring ``x`` equals centring the direction)."""
    columns = decoder["W_U"][:, ids].float()  # [d, members]
    weighted = columns @ coef.T.float()  # [d, batch]
    if decoder["norm_weight"] is not None:
        weighted = weighted * decoder["norm_weight"].to(columns.device).float().unsqueeze(-1)
    vec = weighted.T * norm_scale(final, decoder["norm_kind"], decoder["norm_eps"])
    if decoder["norm_kind"] == "layernorm":
        vec = vec - vec.mean(-1, keepdim=True)
    constant = torch.zeros(coef.shape[0], device=vec.device)
    if decoder["norm_bias"] is not None:
        constant = constant + coef.float() @ (decoder["norm_bias"].to(columns.device).float() @ columns)
    if decoder["b_U"] is not None:
        constant = constant + coef.float() @ decoder["b_U"][ids].float()
    return vec, constant


def attribute(parts, decoder, target_ids, distractor_ids):
    """Direct logit attribution of the vectors in ``parts`` (each ``[batch, ..., d_model]`` at one position):
    ``embed``, optional ``pos_embed``, ``heads [batch, layer, head, d]``, ``head_bias [batch, layer, d]``,
    ``attn`` and ``mlp`` ``[batch, layer, d]`` (what each sublayer added to the stream), ``final [batch, d]``.

    Returns plain tensors: the attribution of each part, ``constant`` (final-norm bias and ``b_U``),
    ``explained`` (the weighted target-minus-distractor logit, pre-soft-cap, from the real final residual),
    ``model_value`` (the same with the model's soft-capped logits), ``coef`` and ``ids`` (member weights) and
    ``reconstruction_error`` (relative norm of ``final`` minus the sum of the parts: 0 up to rounding when
    the parts really are everything the stream holds).
    """
    final = parts["final"].to(decoder["W_U"].device).float()  # work where the unembedding lives
    ids, coef = member_coefficients(final, decoder, target_ids, distractor_ids)
    vec, constant = direction(final, decoder, ids, coef)
    device = vec.device

    def dot(x):
        return torch.einsum("b...d,bd->b...", x.to(device).float(), vec)

    out = {name: dot(parts[name]) for name in ("embed", "heads", "head_bias", "attn", "mlp")}
    total = (parts["embed"].to(device).float() + parts["attn"].to(device).float().sum(1)
             + parts["mlp"].to(device).float().sum(1))
    if parts.get("pos_embed") is not None:
        out["pos_embed"] = dot(parts["pos_embed"])
        total = total + parts["pos_embed"].to(device).float()
    member = member_logits(final, decoder, ids, capped=False) * coef
    capped = member_logits(final, decoder, ids, capped=True) * coef
    out.update(
        constant=constant, explained=member.sum(-1), model_value=capped.sum(-1), coef=coef, ids=ids,
        reconstruction_error=(final - total).norm(dim=-1) / final.norm(dim=-1).clamp(min=1e-12),
    )
    return out


def head_count(model):
    """Attention heads per layer, from the config under any of its usual names."""
    config = getattr(model, "config", None)
    for name in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise AttributeError("the model's config names no head count (num_attention_heads / n_head / num_heads)")


def output_projection(o_proj):
    """``(W_O [n_heads * d_head, d_model], b_O or None)``; GPT-2's ``Conv1D`` stores its weight transposed."""
    module = getattr(o_proj, "_module", o_proj)
    weight = o_proj.weight
    W_O = weight if type(module).__name__ == "Conv1D" else weight.T
    return W_O, getattr(o_proj, "bias", None)


def split_heads(z, o_proj, n_heads, post_norm):
    """Per-head writes ``[batch, heads, d]`` and the output bias ``[batch, d]`` from ``z [batch, heads * d_head]``
    (the input of the output projection), through a sandwich norm frozen at the attention's real output
    when the family has one (``post_norm`` = ``(kind, weight, bias, eps)``)."""
    W_O, b_O = output_projection(o_proj)
    batch = z.shape[0]
    d_head = z.shape[-1] // n_heads
    heads = torch.einsum("bhk,hkd->bhd", z.float().reshape(batch, n_heads, d_head), W_O.float().reshape(n_heads, d_head, -1))
    bias = torch.zeros_like(heads[:, 0]) if b_O is None else b_O.float().expand_as(heads[:, 0])
    if post_norm is None:
        return heads, bias
    kind, weight, _, eps = post_norm
    raw = heads.sum(1) + bias
    mapped = frozen_norm(torch.cat([heads, bias.unsqueeze(1)], dim=1), raw, kind, weight, eps)
    return mapped[:, :-1], mapped[:, -1]


def collect(model, spec, position):
    """Everything the stream holds at ``position``, read inside the trace in forward order: positional
    embeddings, layer 0's input, then per layer the output projection's input (the heads), what attention
    and MLP added, and the last layer's output. Returns the ``parts`` of ``attribute`` plus the residual
    before each layer (``resid_pre [batch, layer, d]``) for the sublayer lens."""
    blocks = get_path(model, spec["layers"])
    n_heads = head_count(model)
    pos_path = spec.get("pos_embed")
    pos_embed = get_path(model, pos_path).output[:, position].float() if pos_path else None
    resid_pre, heads, head_bias, attn, mlp = [], [], [], [], []
    one_plus = spec.get("norm_one_plus", False)
    for layer in range(len(blocks)):
        block = blocks[layer]
        resid = layer_input(block.inputs)
        if layer == 0:
            check_position(position, resid.shape[1])
        resid_pre.append(resid[:, position].float())
        post_norm = norm_params(get_path(block, spec["attn_out"]), one_plus) if spec.get("post_norms") else None
        o_proj = get_path(block, spec["o_proj"])
        h, b = split_heads(_at(o_proj.input, resid, position), o_proj, n_heads, post_norm)
        heads.append(h)
        head_bias.append(b)
        attn.append(_at(layer_output(get_path(block, spec.get("attn_out", spec["attn"])).output), resid, position))
        mlp.append(_at(layer_output(get_path(block, spec.get("mlp_out", spec["mlp"])).output), resid, position))
    final = layer_output(blocks[len(blocks) - 1].output)[:, position].float()
    embed = resid_pre[0] if pos_embed is None else resid_pre[0] - pos_embed
    return {
        "embed": embed, "pos_embed": pos_embed, "heads": _stack(heads, 1), "head_bias": _stack(head_bias, 1),
        "attn": _stack(attn, 1), "mlp": _stack(mlp, 1), "final": final, "resid_pre": _stack(resid_pre, 1),
    }


def _stack(tensors, dim):
    """``torch.stack`` of per-layer tensors that may live on different GPUs (a model split across devices)."""
    return torch.stack([t.to(tensors[0].device) for t in tensors], dim)


def _at(x, resid, position):
    """``x`` at ``position``, ``[batch, width]``; OPT flattens ``[batch * seq, d]`` around its MLP, so ``x`` is
    first given the ``[batch, seq]`` lead of the layer's residual input."""
    return x.reshape(*resid.shape[:2], -1)[:, position].float()


def check_position(position, seq_len):
    if not -seq_len <= position < seq_len:
        raise IndexError(f"position {position} is out of range for a prompt of {seq_len} tokens "
                         f"(valid: {-seq_len} .. {seq_len - 1})")


def check_sublayer_writes(spec):
    """Refuse, with the reason, a family whose sublayer writes cannot be read off module outputs."""
    if spec.get("adds_residual"):
        raise NotImplementedError(
            "this family's attention and MLP add the residual inside the module (BLOOM), so their own writes "
            "are not a module output; sublayer rows and direct logit attribution do not support it yet"
        )


def check_supported(spec):
    """Refuse a family DLA cannot take apart: see ``check_sublayer_writes``, and heads need ``o_proj``."""
    check_sublayer_writes(spec)
    if "o_proj" not in spec:
        raise KeyError("the architecture entry has no 'o_proj' (attention output projection) path; add one to "
                       "lens_plugins.architectures.ARCHITECTURES to attribute to heads")


def token_ids(tokenizer, spec):
    """A target as a list of ids: one token (string or id) or a list of them (a token set). A string that
    is not exactly one token is refused with its tokenisation."""
    members = [spec] if isinstance(spec, (str, int)) else list(spec)
    ids = []
    for member in members:
        if isinstance(member, int):
            ids.append(member)
            continue
        encoded = tokenizer.encode(member, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"target {member!r} is {len(encoded)} tokens (ids {encoded}), not one: pass a "
                             "single-token string (mind the leading space, e.g. ' Paris') or a token id")
        ids.append(encoded[0])
    if not ids:
        raise ValueError("an empty token set: give at least one token, e.g. ' Paris' or [' Paris', 'Paris']")
    return ids


def attribution(model, target, distractor=None, position=-1, layers=None, final_norm=None, lm_head=None):
    """Direct logit attribution at ``position`` of this invoke's prompts, called inside the trace.

    ``target`` / ``distractor`` are single-token strings or ids, or lists of them (token sets, see
    ``member_coefficients``); no distractor attributes the target logit alone. Saves only the attributions
    (``O(layers x heads)`` numbers per prompt): the model's weights and activations stay where the model
    runs. Reads layer 0's input first, so call it before anything later in its block (as ``logit_lens``).
    Turn it into an ``Attribution`` after the trace with ``lp.nnsight.attribution_result(saved, model)``.
    """
    import nnsight

    spec = resolve(model, layers, final_norm, lm_head)
    check_supported(spec)
    target_ids = token_ids(model.tokenizer, target)
    distractor_ids = [] if distractor is None else token_ids(model.tokenizer, distractor)
    parts = collect(model, spec, position)
    with torch.no_grad():
        decoder = decoder_tensors(model, spec)
        out = attribute({k: v.detach() if v is not None else None for k, v in parts.items()}, decoder, target_ids, distractor_ids)
    return nnsight.save({
        "format": FORMAT,
        "values": {name: value.detach().cpu() for name, value in out.items()},
        "parallel": is_parallel(model, spec),
        "position": position,
        "target_ids": list(target_ids),
        "distractor_ids": list(distractor_ids),
    })


def sublayer_stack(model, spec, sublayers):
    """``([rows, batch, seq, d_model], labels)`` of the sublayer lens, read in forward order.

    ``sublayers=True``: the embedding, then the residual after each attention ("3_attn": the layer's input
    plus what attention wrote) and after each MLP ("3_mlp": the next layer's input, or the last layer's
    output). A parallel block (GPT-J, NeoX) has no residual between the two, so it gets one row per layer,
    "3_attn+mlp". ``sublayers="outputs"``: each attention and MLP write decoded alone ("3_attn_out",
    "3_mlp_out"), then the last layer's output ("<L-1>_post") as the reference row.
    """
    if sublayers not in (True, "outputs"):
        raise ValueError(f"sublayers={sublayers!r}: pass True (residual after each sublayer) or 'outputs' "
                         "(each attention / MLP write decoded alone)")
    check_sublayer_writes(spec)
    blocks = get_path(model, spec["layers"])
    n = len(blocks)
    parallel = is_parallel(model, spec)
    rows, labels = [], []
    for layer in range(n):
        block = blocks[layer]
        resid = layer_input(block.inputs)
        if layer == 0 or sublayers is True:  # the embedding; then the residual after the previous layer
            rows.append(resid)
        labels += ["embed"] if layer == 0 else []
        if sublayers is True and parallel:
            labels.append(f"{layer}_attn+mlp")
            continue
        attn = layer_output(get_path(block, spec.get("attn_out", spec["attn"])).output).reshape(resid.shape)
        if sublayers is True:
            rows.append(resid + attn)
            labels += [f"{layer}_attn", f"{layer}_mlp"]
            continue
        mlp = layer_output(get_path(block, spec.get("mlp_out", spec["mlp"])).output).reshape(resid.shape)
        rows += [attn, mlp]
        labels += [f"{layer}_attn_out", f"{layer}_mlp_out"]
    rows.append(layer_output(blocks[n - 1].output))
    if sublayers == "outputs":
        labels.append(f"{n - 1}_post")
    return _stack([row.float() for row in rows], 0), labels
