"""Direct logit attribution arithmetic, on whichever machine holds the activations.

A logit is ``softcap(norm(x) . u + b_U)`` with ``x`` the final residual, which is a sum of what every
embedding, attention head, MLP and bias wrote into the stream. The final norm divides by ``x``'s scale, so
the logit is not linear in those writes; at the scale ``x`` really had on this forward pass it is. Freezing
that scale (and folding the norm's weight, Gemma's ``1 + w`` included, into the direction) gives the
standard direct logit attribution: each write dotted with one direction, plus a constant for the norm's
bias and ``b_U``, summing exactly to the pre-soft-cap logit (or logit difference) of the real pass.

Everything here is torch-only, undecorated and returns plain dicts: the same functions run on a
TransformerLens cache on the caller's machine and inside an nnsight trace (``core.trace.attribution``) on an
NDIF server, so both backends share one piece of arithmetic.
"""

import numbers

import torch

from lens_plugins.core import discovery
from lens_plugins.core.errors import (
    LensAttributeError,
    LensIndexError,
    LensKeyError,
    LensNotImplementedError,
    LensTypeError,
    LensValueError,
)
from lens_plugins.core.readout import all_finite


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


def member_coefficients(capped, n_targets):
    """``coef [batch, members]`` from the members' soft-capped logits (targets first): each target token's share
    of the target set's probability at the real forward pass, and minus each distractor's share of the
    distractor set's (one token: +1 / -1).

    The weighted member logit is what a token set's attribution explains: it is linear in the residual, and
    at the frozen point its gradient equals that of the set's log-probability (the log-sum-exp direction).
    """
    return torch.cat([capped[:, :n_targets].softmax(-1), -capped[:, n_targets:].softmax(-1)], dim=-1)


def column_logits(normed, decoder, ids):
    """``(raw, capped)``: the logits of the vocabulary columns ``ids`` at already-normed residuals, before and
    after the soft-cap (the same tensor without one): ``d_model`` dot products per id, no vocabulary pass."""
    logits = normed @ decoder.W_U[:, ids].float()
    if decoder.b_U is not None:
        logits = logits + decoder.b_U[ids].float()
    if decoder.softcap is None:
        return logits, logits
    return logits, decoder.softcap * torch.tanh(logits / decoder.softcap)


def direction(final, decoder, ids, coef):
    """``(direction [batch, d_model], constant [batch])`` with ``explained = component . direction`` summed
    plus ``constant``: the unembedding columns weighted by ``coef``, times the final norm's weight and its
    frozen scale, centred for a LayerNorm (centring ``x`` equals centring the direction)."""
    columns = decoder.W_U[:, ids].float()  # [d, members]
    weighted = columns @ coef.T.float()  # [d, batch]
    if decoder.norm_weight is not None:
        weighted = weighted * decoder.norm_weight.to(columns.device).float().unsqueeze(-1)
    vec = weighted.T * norm_scale(final, decoder.norm_kind, decoder.norm_eps)
    if decoder.norm_kind == "layernorm":
        vec = vec - vec.mean(-1, keepdim=True)
    constant = torch.zeros(coef.shape[0], device=vec.device)
    if decoder.norm_bias is not None:
        constant = constant + coef.float() @ (decoder.norm_bias.to(columns.device).float() @ columns)
    if decoder.b_U is not None:
        constant = constant + coef.float() @ decoder.b_U[ids].float()
    return vec, constant


def component_label(name, index):
    """The ``Attribution`` label of entry ``index`` (``[batch, ...]``, without the width) of part ``name``."""
    if name == "heads":
        return f"L{index[1]}H{index[2]}"
    if name == "head_bias":
        return f"{index[1]}_attn_bias"
    if name in ("attn", "mlp"):
        return f"{index[1]}_{name}"
    return name


# The parts of ``attribute`` in stream order within a layer (embeddings before layer 0, the final residual last).
PART_ORDER = ("embed", "pos_embed", "heads", "head_bias", "attn", "mlp", "final")


def check_parts(parts):
    """Refuse residual parts (``attribute``'s ``parts``) holding NaN or inf, naming the component where the
    stream first turns non-finite (earliest layer; within it, heads before the attention and MLP writes) and
    the batch item: every later write reads it, and the frozen norm scale would make every attribution NaN.
    One ``isfinite`` pass per part."""
    first = None
    for order, name in enumerate(PART_ORDER):
        part = parts.get(name)
        if part is None or all_finite(part):
            continue
        bad = ~torch.isfinite(part).all(-1)
        if not bad.any():
            continue
        found = bad.nonzero()
        index = found[found[:, 1].argmin()] if found.shape[1] > 1 else found[0]  # the earliest layer
        layer = int(index[1]) if found.shape[1] > 1 else (-1 if name != "final" else float("inf"))
        if first is None or (layer, order) < first[0]:
            first = ((layer, order), name, [int(i) for i in index], part)
    if first is not None:
        _, name, index, part = first
        where = "the final residual" if name == "final" else f"component {component_label(name, index)!r}"
        kind = "NaN" if bool(torch.isnan(part[tuple(index)]).any()) else "inf"
        raise LensValueError(
            f"the residual stream holds {kind} from {where} on (part {name!r}, batch item {index[0]}): attributing "
            "it would make every attribution NaN. Check the model's weights and activations (an overflow in "
            "half precision?) before attributing them")


def attribute(parts, decoder, target_ids, distractor_ids, neurons=None, top_neurons=0, effects=0):
    """Direct logit attribution of the vectors in ``parts`` (each ``[batch, ..., d_model]`` at one position):
    ``embed``, optional ``pos_embed``, ``heads [batch, layer, head, d]``, ``head_bias [batch, layer, d]``,
    ``attn`` and ``mlp`` ``[batch, layer, d]`` (what each sublayer added to the stream), ``final [batch, d]``;
    ``decoder`` is a ``readout.DecoderTensors``.

    Returns plain tensors: the attribution of each part, ``constant`` (final-norm bias and ``b_U``),
    ``explained`` (the weighted target-minus-distractor logit, pre-soft-cap, from the real final residual),
    ``model_value`` (the same with the model's soft-capped logits), ``coef`` and ``ids`` (member weights) and
    ``reconstruction_error`` (relative norm of ``final`` minus the sum of the parts: 0 up to rounding when
    the parts really are everything the stream holds). Non-finite parts are refused (``check_parts``).

    ``neurons`` (one ``(acts, W_out, b_out)`` per layer, ``neuron_attribution``) adds the neuron split of every
    MLP and its ``top_neurons`` largest neurons; ``effects=k`` adds the ``k`` tokens every write (and every top
    neuron) promotes and suppresses most (``write_effects``).
    """
    check_parts(parts)
    final = parts["final"].to(decoder.W_U.device).float()  # work where the unembedding lives
    ids = torch.tensor(list(target_ids) + list(distractor_ids), dtype=torch.long, device=decoder.W_U.device)
    normed = decoder.normalize(final)
    raw, capped = column_logits(normed, decoder, ids)
    coef = member_coefficients(capped, len(target_ids))
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
    out.update(
        constant=constant, explained=(raw * coef).sum(-1), model_value=(capped * coef).sum(-1), coef=coef, ids=ids,
        reconstruction_error=(final - total).norm(dim=-1) / final.norm(dim=-1).clamp(min=1e-12),
    )
    chosen = None
    if neurons is not None:
        chosen = neuron_attribution(neurons, vec, top_neurons)
        out.update(chosen)
    if effects:
        out.update(write_effects(effect_writes(parts, neurons, chosen), final, decoder, effects))
    return out


NEURON_CHUNK = 8192  # neurons of one layer whose W_out rows are dotted with the direction at once
VOCAB_CHUNK = 8192  # vocabulary columns per matmul when ranking the tokens a write promotes and suppresses


def neuron_attribution(neurons, vec, top):
    """Direct logit attribution of single MLP neurons: neuron ``i`` of a layer writes ``a_i * W_out[i]``, so
    its attribution is ``a_i * (W_out[i] . direction)``, the same frozen-norm direction as every other part.

    ``neurons`` holds one ``(acts [batch, n], W_out [n, d_model], b_out [d_model] or None)`` per layer (the
    activations entering the MLP's output projection at the position); ``vec [batch, d_model]`` is the
    direction. Chunked over neurons (``NEURON_CHUNK``) and reduced to a running top ``top``, so memory is
    ``O(batch x (chunk + top))`` whatever the width. The top neurons are one list for the whole batch (ranked
    by their summed magnitude over the prompts), so every prompt's attribution has the same labels. Returns
    ``neuron_sums [batch, layer]`` (a layer's neurons in all: plus ``mlp_bias`` exactly that layer's MLP
    attribution), ``mlp_bias [batch, layer]`` (the output bias's share, ``b_out . direction``),
    ``neuron_values [batch, top]`` and their ``neuron_layers`` / ``neuron_index [top]``, largest first."""
    device = vec.device
    batch = vec.shape[0]
    best_score = torch.zeros(0, device=device)
    best_vals = torch.zeros(batch, 0, device=device)
    best_layer = torch.zeros(0, dtype=torch.long, device=device)
    best_index = torch.zeros(0, dtype=torch.long, device=device)
    sums, biases = [], []
    for layer, (acts, W_out, b_out) in enumerate(neurons):
        acts = acts.to(device).float()
        total = torch.zeros(batch, device=device)
        for n0 in range(0, W_out.shape[0], NEURON_CHUNK):
            rows = W_out[n0:n0 + NEURON_CHUNK].to(device).float()  # [chunk, d]
            values = acts[:, n0:n0 + NEURON_CHUNK] * (vec @ rows.T)  # [batch, chunk]
            total = total + values.sum(-1)
            score = torch.cat([best_score, values.abs().sum(0)])
            keep = score.topk(min(top, score.shape[0])).indices
            best_score = score[keep]
            best_vals = torch.cat([best_vals, values], -1)[:, keep]
            index = torch.arange(n0, n0 + rows.shape[0], device=device)
            best_layer = torch.cat([best_layer, torch.full_like(index, layer)])[keep]
            best_index = torch.cat([best_index, index])[keep]
        sums.append(total)
        biases.append(torch.zeros(batch, device=device) if b_out is None else vec @ b_out.to(device).float())
    return {"neuron_sums": torch.stack(sums, 1), "mlp_bias": torch.stack(biases, 1), "neuron_values": best_vals,
            "neuron_layers": best_layer, "neuron_index": best_index}


def neuron_writes(neurons, layers, index):
    """``[batch, top, d_model]``: what the chosen neurons (``neuron_layers`` / ``neuron_index [top]``) wrote,
    ``a_i * W_out[i]``."""
    writes = []
    for layer, i in zip(layers.tolist(), index.tolist()):
        acts, W_out, _ = neurons[layer]
        writes.append(acts[:, i].float().unsqueeze(-1) * W_out[i].float().to(acts.device))
    return torch.stack(writes, 1)


def write_effects(writes, final, decoder, k):
    """The ``k`` tokens each write promotes and suppresses most: ``writes [batch, C, d_model]`` through the
    final norm frozen at ``final [batch, d_model]``'s scale (its weight included, centred for a LayerNorm; no
    bias: a write's own effect) and the unembedding ``W_U`` (no ``b_U``, no soft-cap), the vocabulary in chunks
    of ``VOCAB_CHUNK`` with a running top-k at both ends. Returns ``promoted_ids`` / ``promoted_logits`` and
    ``suppressed_ids`` / ``suppressed_logits`` ``[batch, C, k]`` (most promoted, most suppressed first)."""
    W_U = decoder.W_U
    device = W_U.device
    mapped = frozen_norm(writes.to(device), final.to(device), decoder.norm_kind, decoder.norm_weight, decoder.norm_eps)
    batch, n, d = mapped.shape
    flat = mapped.reshape(batch * n, d)
    k = min(k, W_U.shape[1])
    ends = {}
    for sign, name in ((1.0, "promoted"), (-1.0, "suppressed")):
        vals = torch.full((batch * n, 0), float("-inf"), device=device)
        ids = torch.zeros(batch * n, 0, dtype=torch.long, device=device)
        for v0 in range(0, W_U.shape[1], VOCAB_CHUNK):
            logits = sign * (flat @ W_U[:, v0:v0 + VOCAB_CHUNK].float())
            chunk_vals, chunk_ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
            merged_vals, merged_ids = torch.cat([vals, chunk_vals], -1), torch.cat([ids, chunk_ids + v0], -1)
            vals, order = merged_vals.topk(min(k, merged_vals.shape[-1]), dim=-1)
            ids = merged_ids.gather(-1, order)
        ends[f"{name}_ids"] = ids.reshape(batch, n, -1)
        ends[f"{name}_logits"] = (sign * vals).reshape(batch, n, -1)
    return ends


def effect_writes(parts, neurons, chosen):
    """``[batch, C, d_model]``: every write whose promoted and suppressed tokens are reported, in the order of
    ``effect_labels``: the embeddings, then per layer each head, the attention output bias, the attention in
    all and the MLP, then the top neurons (``chosen``: ``neuron_attribution``'s, when neurons were read)."""
    batch = parts["final"].shape[0]
    d = parts["final"].shape[-1]
    device = parts["final"].device
    writes = [parts["embed"].unsqueeze(1)]
    if parts.get("pos_embed") is not None:
        writes.append(parts["pos_embed"].unsqueeze(1))
    for layer in range(parts["attn"].shape[1]):
        writes += [parts["heads"][:, layer], parts["head_bias"][:, layer].unsqueeze(1), parts["attn"][:, layer].unsqueeze(1),
                   parts["mlp"][:, layer].unsqueeze(1)]
    if chosen is not None and chosen["neuron_index"].numel():
        writes.append(neuron_writes(neurons, chosen["neuron_layers"], chosen["neuron_index"]))
    return torch.cat([w.to(device).float().reshape(batch, -1, d) for w in writes], 1)


def effect_labels(n_layers, n_heads, pos_embed, n_neurons):
    """The labels of ``effect_writes``' rows (a top neuron is ``"neuron j"``, its layer and index per prompt
    being ``neuron_layers`` / ``neuron_index``)."""
    labels = ["embed"] + (["pos_embed"] if pos_embed else [])
    for layer in range(n_layers):
        labels += [f"L{layer}H{h}" for h in range(n_heads)] + [f"{layer}_attn_bias", f"{layer}_attn", f"{layer}_mlp"]
    return labels + [f"neuron {j}" for j in range(n_neurons)]


def head_count(model):
    """Attention heads per layer, from the config under any of its usual names."""
    config = discovery.text_config(getattr(model, "config", None))
    for name in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise LensAttributeError("the model's config names no head count (num_attention_heads / n_head / num_heads)")


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
    return through_post_norm(heads, bias, post_norm)


def through_post_norm(heads, bias, post_norm):
    """``(heads, bias)`` through a sandwich norm frozen at the attention's real output (their sum), or as they
    are without one (``post_norm`` ``None``): each part scaled as the sum was, so the parts still add up."""
    if post_norm is None:
        return heads, bias
    kind, weight, _, eps = post_norm
    mapped = frozen_norm(torch.cat([heads, bias.unsqueeze(1)], dim=1), heads.sum(1) + bias, kind, weight, eps)
    return mapped[:, :-1], mapped[:, -1]


def check_position(position, attention_mask):
    """Refuse a position outside the prompt, or one that is padding in any prompt of the batch (padding
    has no prediction to attribute: pad on the left to attribute every prompt's last token)."""
    seq_len = attention_mask.shape[-1]
    if isinstance(position, bool) or not isinstance(position, numbers.Integral):
        raise LensTypeError(f"position must be one integer position (e.g. position=-1, the last token), got "
                            f"{position!r}")
    if not -seq_len <= position < seq_len:
        raise LensIndexError(f"position {position} is out of range for a prompt of {seq_len} tokens "
                         f"(valid: {-seq_len} .. {seq_len - 1})")
    padded = (attention_mask[:, position] == 0).nonzero().reshape(-1).tolist()
    if padded:
        raise LensValueError(f"position {position} is padding in prompt(s) {padded} of the batch: there is no "
                         "prediction to attribute there. Pad on the left (padding_side='left') to attribute "
                         "each prompt's last token at position -1, or attribute the prompts one at a time.")


def check_sublayer_writes(spec):
    """Refuse, with the reason, a family whose sublayer writes cannot be read off module outputs."""
    if spec.get("adds_residual"):
        raise LensNotImplementedError(
            "this family's attention and MLP add the residual inside the module (BLOOM), so their own writes "
            "are not a module output; sublayer rows and direct logit attribution do not support it yet"
        )
    if spec.get("sublayers_refused"):  # set by core.verification from the model's own numbers
        raise LensNotImplementedError(f"sublayer rows and direct logit attribution are refused for this model: "
                                      f"{spec['sublayers_refused']}")


def check_neurons(spec, top_neurons, effects):
    """Refuse what neuron attribution cannot do, before anything runs: a family whose MLP output projection
    is not in the table (a mixture of experts has many), or whose MLP write passes a sandwich norm (a neuron's
    write would need that norm frozen too: not supported yet); and counts that are not positive integers."""
    for name, value, low in (("top_neurons", top_neurons, 1), ("effects", effects, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LensValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if spec is None:
        return
    if spec.get("post_norms"):
        raise LensNotImplementedError(
            "this family's MLP write passes a norm after the MLP (a sandwich norm: Gemma 2/3, OLMo 2), so a "
            "neuron's write is not its activation times its W_out row; by='neuron' does not support it yet: use "
            "by='component' or by='head'")
    if "neuron_out" not in spec:
        raise LensKeyError("the architecture entry has no 'neuron_out' (the MLP's output projection, whose input "
                           "is the neuron activations) path: add one to lens_plugins.core.architectures.ARCHITECTURES "
                           "(or paths={'neuron_out': ...}) to attribute to neurons")


def check_supported(spec):
    """Refuse a family DLA cannot take apart: see ``check_sublayer_writes``, and heads need ``o_proj``."""
    check_sublayer_writes(spec)
    if spec.get("heads_refused"):  # set by core.verification from the model's own numbers
        raise LensNotImplementedError(f"direct logit attribution by head is refused for this model: "
                                      f"{spec['heads_refused']}")
    if "o_proj" not in spec:
        raise LensKeyError("the architecture entry has no 'o_proj' (attention output projection) path; add one to "
                       "lens_plugins.core.architectures.ARCHITECTURES to attribute to heads")

__all__ = ["norm_scale", "frozen_norm", "member_coefficients", "column_logits", "direction", "component_label",
    "NEURON_CHUNK", "VOCAB_CHUNK", "neuron_attribution", "neuron_writes", "write_effects", "effect_writes",
    "effect_labels", "check_neurons",
    "PART_ORDER", "check_parts", "attribute",
    "head_count", "output_projection", "split_heads", "through_post_norm", "check_position",
    "check_sublayer_writes", "check_supported"]
