"""Chunked, fused decoding of a residual stack into lens statistics.

This module is the part of lens_plugins that runs where the activations live: on the
caller's machine for a TransformerLens cache, on the NDIF server for a remote nnsight
trace. It therefore imports nothing but torch, takes every input as an argument
(tensors, numbers, strings) and carries no decorators: nnsight ships these functions
by source and rebuilds them without their module's globals or type checkers.

The cost of a full logit lens is the unembedding, ``rows x tokens x d_model x vocab``
multiply-adds, and then every statistic wants another pass over the same logits.
``lens_statistics`` produces the logits one tile (``token_chunk`` tokens x
``vocab_chunk`` vocabulary entries) at a time and consumes each tile while it is still
hot in cache, with an online softmax (running max, running sums of ``e`` and ``e*l``),
a merged running top-k and running rank counts, so that no ``[rows, tokens, vocab]``
tensor ever exists and ``W_U`` is read once per row per token chunk.

Conventions: the last row of the stack is the reference ("final") distribution that
the KL divergences and the final top-1 refer to; ranks are ``1 + #{v != t : l_v > l_t}``
(ties share the best rank); every quantity is computed in float32.
"""

import torch

NO_TARGET = -1  # a target id that means "nothing to score here" (e.g. the last position's next token)


def apply_final_norm(x, norm_kind, norm_weight, norm_bias, norm_eps):
    """The model's final norm on ``x [..., d_model]``, in float32.

    ``norm_kind`` is ``"rmsnorm"``, ``"layernorm"`` or ``"none"``. Families that scale by
    ``(1 + w)`` (Gemma) pass ``1 + w`` as ``norm_weight``; a folded norm passes ``None``.
    """
    x = x.float()
    if norm_kind == "rmsnorm":
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps)
    elif norm_kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps)
    elif norm_kind != "none":
        raise ValueError(f"unknown norm_kind {norm_kind!r}: expected 'rmsnorm', 'layernorm' or 'none'")
    if norm_weight is not None:
        x = x * norm_weight.float()
    if norm_bias is not None:
        x = x + norm_bias.float()
    return x


def unembed(normed, W_U, b_U, softcap):
    """Float32 logits ``[..., vocab]`` of already-normed residuals (full vocabulary: use sparingly)."""
    logits = normed.float() @ W_U.float()
    if b_U is not None:
        logits = logits + b_U.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _logit_tile(normed, W_chunk, b_chunk, softcap):
    tile = normed @ W_chunk
    if b_chunk is not None:
        tile += b_chunk
    if softcap is not None:
        tile = torch.tanh(tile.div_(softcap)).mul_(softcap)
    return tile


def _target_logits(normed, W_U, b_U, softcap, ids):
    """Logit of ``ids [tokens, T]`` at every row of ``normed [rows, tokens, d]``: d_model dot products,
    no vocabulary pass. Invalid ids (``NO_TARGET``) get ``+inf`` so that nothing counts above them."""
    valid = ids >= 0
    safe = ids.clamp(min=0)
    columns = W_U.T[safe].float()  # [tokens, T, d]
    logits = torch.einsum("rnd,ntd->rnt", normed, columns)
    if b_U is not None:
        logits = logits + b_U.float()[safe]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.where(valid, logits, torch.full_like(logits, float("inf")))


def _softmax_update(tile, m, s, exp_buffer):
    """Online-softmax step for one tile: returns the tile's max, the new running max, the factor that rescales
    sums taken under the old max, and fills ``exp_buffer`` with ``exp(tile - new max)``."""
    tile_max = tile.amax(-1)
    m_new = torch.maximum(m, tile_max)
    rescale = torch.exp(m - m_new)
    torch.exp(torch.sub(tile, m_new.unsqueeze(-1), out=exp_buffer), out=exp_buffer)
    return tile_max, m_new, rescale, s * rescale + exp_buffer.sum(-1)


def _reference_pass(normed_ref, W_U, b_U, softcap, vocab_chunk):
    """Log-partition and top-1 of the reference row, with the exact tile arithmetic of the main
    pass so that the reference compared with itself gives bitwise-zero divergences."""
    n = normed_ref.shape[0]
    vocab = W_U.shape[1]
    m = torch.full((n,), float("-inf"))
    s = torch.zeros(n)
    best = torch.full((n,), float("-inf"))
    best_id = torch.zeros(n, dtype=torch.long)
    exp_buffer = torch.empty(n, min(vocab_chunk, vocab))
    for v0 in range(0, vocab, vocab_chunk):
        v1 = min(v0 + vocab_chunk, vocab)
        tile = _logit_tile(normed_ref, W_U[:, v0:v1].float(), None if b_U is None else b_U[v0:v1].float(), softcap)
        _, m, _, s = _softmax_update(tile, m, s, exp_buffer[:, : v1 - v0])
        value, index = tile.max(-1)
        better = value > best
        best = torch.where(better, value, best)
        best_id = torch.where(better, index + v0, best_id)
    return m + torch.log(s), best_id


def lens_statistics(
    resid,
    norm_kind,
    norm_weight,
    norm_bias,
    norm_eps,
    W_U,
    b_U,
    softcap,
    top_k,
    target_ids,
    vocab_chunk=4096,
    token_chunk=256,
):
    """Decode every row of ``resid [rows, tokens, d_model]`` and reduce it on the fly.

    ``W_U`` is ``[d_model, vocab]``; ``target_ids [tokens, T]`` holds token ids to score at
    each token (``NO_TARGET`` where there is none). The last row is the reference.
    Returns a dict of float32 / int64 tensors, ``[rows, tokens]`` unless noted:

    - ``top_ids``, ``top_logprobs`` ``[rows, tokens, top_k]``: the row's top-k, best first
    - ``entropy``: in nats
    - ``kl_final_row``: KL(reference || row); ``kl_row_final``: KL(row || reference)
    - ``final_top1``: ``[tokens]`` the reference's argmax; ``final_top1_logprob``, ``final_top1_rank``
    - ``target_logprobs``, ``target_ranks`` ``[rows, tokens, T]``: NaN and -1 where there is no target

    Extra memory is ``O(rows x token_chunk x (vocab_chunk + d_model))``, independent of the vocabulary
    and of the number of tokens; the results do not depend on either chunk size beyond float rounding.
    """
    if vocab_chunk < 1 or token_chunk < 1:
        raise ValueError(f"chunk sizes must be positive, got vocab_chunk={vocab_chunk}, token_chunk={token_chunk}")
    if vocab_chunk > 32767:
        raise ValueError(f"vocab_chunk={vocab_chunk} exceeds 32767, the largest tile the int16 rank counter holds")
    rows, tokens, _ = resid.shape
    vocab = W_U.shape[1]
    k = min(top_k, vocab)
    n_targets = target_ids.shape[1]
    out = {
        "top_ids": torch.zeros(rows, tokens, k, dtype=torch.long),
        "top_logprobs": torch.zeros(rows, tokens, k),
        "entropy": torch.zeros(rows, tokens),
        "kl_final_row": torch.zeros(rows, tokens),
        "kl_row_final": torch.zeros(rows, tokens),
        "final_top1": torch.zeros(tokens, dtype=torch.long),
        "final_top1_logprob": torch.zeros(rows, tokens),
        "final_top1_rank": torch.zeros(rows, tokens, dtype=torch.long),
        "target_logprobs": torch.zeros(rows, tokens, n_targets),
        "target_ranks": torch.zeros(rows, tokens, n_targets, dtype=torch.long),
    }
    for n0 in range(0, tokens, token_chunk):
        n1 = min(n0 + token_chunk, tokens)
        block = _lens_block(
            resid[:, n0:n1], norm_kind, norm_weight, norm_bias, norm_eps, W_U, b_U, softcap, k,
            target_ids[n0:n1], vocab_chunk,
        )
        for name, value in block.items():
            if name == "final_top1":
                out[name][n0:n1] = value
            else:
                out[name][:, n0:n1] = value
    return out


def _lens_block(resid, norm_kind, norm_weight, norm_bias, norm_eps, W_U, b_U, softcap, k, target_ids, vocab_chunk):
    rows, n, _ = resid.shape
    vocab = W_U.shape[1]
    normed = apply_final_norm(resid, norm_kind, norm_weight, norm_bias, norm_eps)
    lse_ref, final_top1 = _reference_pass(normed[-1], W_U, b_U, softcap, vocab_chunk)
    ids = torch.cat([final_top1.unsqueeze(-1), target_ids.long()], dim=-1)  # [n, 1 + T]
    thresholds = _target_logits(normed, W_U, b_U, softcap, ids)  # [rows, n, 1 + T]

    m = torch.full((rows, n), float("-inf"))
    s = torch.zeros(rows, n)
    sum_el = torch.zeros(rows, n)  # running sum of e * (own logit)
    sum_e_ref = torch.zeros(rows, n)  # running sum of e * (reference logit)
    # E_ref[own logit] = sum_v p_ref(v) l(v). Without a soft-cap the logits are affine in the normed
    # residual, so it is normed . (W_U p_ref) + b_U . p_ref: one [tokens, d_model] vector per vocabulary
    # chunk instead of a pass over every row's logits. With a soft-cap it is summed tile by tile.
    affine = softcap is None
    W_p_ref = torch.zeros(n, normed.shape[-1])
    b_p_ref = torch.zeros(n)
    sum_pref_l = torch.zeros(rows, n)
    counts = torch.zeros(rows, n, ids.shape[1], dtype=torch.long)
    top_vals = torch.full((rows, n, k), float("-inf"))
    top_ids = torch.zeros(rows, n, k, dtype=torch.long)
    width = min(vocab_chunk, vocab)
    exp_buffer = torch.empty(n, width)
    pref_buffer = torch.empty(n, width)
    product = torch.empty(n, width)
    above = torch.empty(n, width, dtype=torch.bool)

    def dot(a, b):  # row-wise dot product through a reused buffer: no 4 MB allocation per tile
        return torch.mul(a, b, out=product[:, : a.shape[1]]).sum(-1)

    for v0 in range(0, vocab, vocab_chunk):
        v1 = min(v0 + vocab_chunk, vocab)
        w = v1 - v0
        W_chunk = W_U[:, v0:v1].float()
        b_chunk = None if b_U is None else b_U[v0:v1].float()
        ref_tile = _logit_tile(normed[-1], W_chunk, b_chunk, softcap)
        p_ref = torch.exp(torch.sub(ref_tile, lse_ref.unsqueeze(-1), out=pref_buffer[:, :w]), out=pref_buffer[:, :w])
        if affine:
            W_p_ref += p_ref @ W_chunk.T
            if b_chunk is not None:
                b_p_ref += p_ref @ b_chunk
        in_chunk = (ids >= v0) & (ids < v1)
        for r in range(rows):
            tile = ref_tile if r == rows - 1 else _logit_tile(normed[r], W_chunk, b_chunk, softcap)
            e = exp_buffer[:, :w]
            tile_max, m_new, rescale, s[r] = _softmax_update(tile, m[r], s[r], e)
            sum_el[r] = sum_el[r] * rescale + dot(e, tile)
            sum_e_ref[r] = sum_e_ref[r] * rescale + dot(e, ref_tile)
            if not affine:
                sum_pref_l[r] += dot(p_ref, tile)
            m[r] = m_new
            _merge_top_k(tile, tile_max, v0, top_vals[r], top_ids[r])
            _count_above(tile, tile_max, thresholds[r], in_chunk, ids, v0, counts[r], above[:, :w])
    if affine:
        sum_pref_l = (normed * W_p_ref).sum(-1) + b_p_ref

    lse = m + torch.log(s)
    sum_pref_lref = sum_pref_l[-1]
    logprob_targets = thresholds - lse.unsqueeze(-1)
    ranks = counts + 1
    valid = (ids >= 0).unsqueeze(0).expand_as(ranks)
    logprob_targets = torch.where(valid, logprob_targets, torch.full_like(logprob_targets, float("nan")))
    ranks = torch.where(valid, ranks, torch.full_like(ranks, -1))
    return {
        "top_ids": top_ids,
        "top_logprobs": top_vals - lse.unsqueeze(-1),
        "entropy": lse - sum_el / s,
        "kl_final_row": (sum_pref_lref - lse_ref) - (sum_pref_l - lse),
        "kl_row_final": (sum_el - sum_e_ref) / s - lse + lse_ref,
        "final_top1": final_top1,
        "final_top1_logprob": logprob_targets[..., 0],
        "final_top1_rank": ranks[..., 0],
        "target_logprobs": logprob_targets[..., 1:],
        "target_ranks": ranks[..., 1:],
    }


def _merge_top_k(tile, tile_max, v0, top_vals, top_ids):
    """Merge a tile into a running top-k, touching only the tokens whose tile max beats their k-th best."""
    k = top_vals.shape[-1]
    rows = torch.nonzero(tile_max > top_vals[:, -1]).squeeze(-1)
    if rows.numel() == 0:
        return
    vals, idx = tile.index_select(0, rows).topk(min(k, tile.shape[-1]), dim=-1)
    merged_vals = torch.cat([top_vals.index_select(0, rows), vals], dim=-1)
    merged_ids = torch.cat([top_ids.index_select(0, rows), idx + v0], dim=-1)
    best_vals, order = merged_vals.topk(k, dim=-1)
    top_vals[rows] = best_vals
    top_ids[rows] = merged_ids.gather(-1, order)


def _count_above(tile, tile_max, thresholds, in_chunk, ids, v0, counts, above):
    """Add, per token and target, how many tile logits lie strictly above the target's logit,
    not counting the target itself (its tile logit may round a hair above the dot product)."""
    for j in range(thresholds.shape[-1]):
        threshold = thresholds[:, j]
        if not bool((tile_max > threshold).any()):
            continue
        torch.gt(tile, threshold.unsqueeze(-1), out=above)
        counts[:, j] += above.view(torch.uint8).sum(-1, dtype=torch.int16)
        here = torch.nonzero(in_chunk[:, j]).squeeze(-1)
        if here.numel():
            own = tile[here, ids[here, j] - v0]
            counts[here, j] -= (own > threshold[here]).long()
