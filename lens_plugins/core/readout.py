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

from lens_plugins.core.reductions import READOUT, TABLE

NO_TARGET = -1  # a target id that means "nothing to score here" (e.g. the last position's next token)
# Shifted logits are clamped here before exp: below about -87.3, float32 exp is subnormal, which torch's
# vectorised exp computes some 70x slower (measured: 33 ms vs 0.46 ms per million). exp(-87) = 1.6e-38 is
# negligible in any sum it joins (a normaliser is >= 1), so the clamp changes no reported digit.
EXP_FLOOR = -87.0


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
        x = x * norm_weight.to(x.device, torch.float32)
    if norm_bias is not None:
        x = x + norm_bias.to(x.device, torch.float32)
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


def _exp_shifted(tile, shift, out):
    """``exp(tile - shift[:, None])`` into ``out``, with the subnormal range clamped away (see EXP_FLOOR)."""
    torch.sub(tile, shift.unsqueeze(-1), out=out)
    return torch.exp(out.clamp_(min=EXP_FLOOR), out=out)


def _softmax_update(tile, m, s, exp_buffer):
    """Online-softmax step for one tile: returns the tile's max, the new running max, the factor that rescales
    sums taken under the old max, and fills ``exp_buffer`` with ``exp(tile - new max)``."""
    tile_max = tile.amax(-1)
    m_new = torch.maximum(m, tile_max)
    rescale = torch.exp(m - m_new)
    _exp_shifted(tile, m_new, exp_buffer)
    return tile_max, m_new, rescale, s * rescale + exp_buffer.sum(-1)


def _reference_pass(normed_ref, W_U, b_U, softcap, vocab_chunk, fused_step=None, n_thresholds=0):
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
        if fused_step is None:
            _, m, _, s = _softmax_update(tile, m, s, exp_buffer[:, : v1 - v0])
        else:  # the main pass's compiled step, same shapes and all, so the reference matches itself bitwise
            _, m, s, _, _, _ = fused_step(tile, tile, m, s, s, s, torch.full((n, n_thresholds), float("inf")))
        value, index = tile.max(-1)
        better = value > best
        best = torch.where(better, value, best)
        best_id = torch.where(better, index + v0, best_id)
    return m + torch.log(s), best_id


# Every reduction the readout can compute, each opt-in by name (a remote trace computes and downloads
# only what was asked for), and the result fields each fills: ``lens_plugins.core.reductions.TABLE``.
# ``log_partition`` (logsumexp of each row's logits) always comes back: every log-prob is a logit minus it.
REDUCTIONS = READOUT
DEFAULT_REDUCTIONS = tuple(name for name in READOUT if TABLE[name]["default"]) + ("targets",)


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
    reductions=DEFAULT_REDUCTIONS,
    fused_step=None,
):
    """Decode every row of ``resid [rows, tokens, d_model]`` and reduce it on the fly.

    ``W_U`` is ``[d_model, vocab]``; ``target_ids [tokens, T]`` holds token ids to score at each token
    (``NO_TARGET`` where there is none). Row 0 is the input row (the embeddings), the last row the
    reference ("final"). Returns float32 / int64 tensors, ``[rows, tokens]`` unless noted, for the
    requested ``reductions``:

    - ``top_k``: ``top_ids``, ``top_logprobs`` ``[rows, tokens, top_k]``, best first
    - ``entropy``: in nats
    - ``kl_final_row``: KL(final || row); ``kl_row_final``: KL(row || final)
    - ``js_final``: Jensen-Shannon divergence to the final row (<= ln 2); ``tv_final``: total variation
      distance, half the L1 distance (<= 1). These two need the rows' normalisers first, so they cost a
      second pass over the vocabulary.
    - ``kl_input_row``: KL(input || row), the input row being row 0 decoded through the same lens
    - ``kl_next_row``: KL(row || next row); NaN at the last row
    - ``final_top1``: ``final_top1 [tokens]`` (the final row's argmax), ``final_top1_logprob``, ``final_top1_rank``
    - ``targets``: ``target_logprobs``, ``target_ranks`` ``[rows, tokens, T]``; NaN and -1 where there is none

    Extra memory is ``O(rows x token_chunk x (vocab_chunk + d_model))``, independent of the vocabulary
    and of the number of tokens; the results do not depend on either chunk size beyond float rounding.

    ``fused_step``, if given, is ``fused_tile_step`` compiled into one loop per tile (see
    ``lens_plugins.fused``); it replaces the eager one-pass-per-quantity step wherever it applies.
    """
    unknown = [name for name in reductions if name not in REDUCTIONS]
    if unknown:
        raise ValueError(f"unknown reductions {unknown}; choose from {list(REDUCTIONS)}")
    if vocab_chunk < 1 or token_chunk < 1:
        raise ValueError(f"chunk sizes must be positive, got vocab_chunk={vocab_chunk}, token_chunk={token_chunk}")
    if vocab_chunk > 32767:
        raise ValueError(f"vocab_chunk={vocab_chunk} exceeds 32767, the largest tile the int16 rank counter holds")
    rows, tokens, _ = resid.shape
    want = set(reductions)
    # Work where the unembedding lives (on a multi-GPU server, the last layer's device); results stay
    # there too, for the caller to move.
    device = W_U.device
    resid = resid.to(device)
    target_ids = target_ids.to(device)
    if "targets" not in want:
        target_ids = target_ids[:, :0]
    blocks = []
    with torch.device(device):  # every buffer below is allocated next to W_U
        for n0 in range(0, tokens, token_chunk):
            n1 = min(n0 + token_chunk, tokens)
            blocks.append(_lens_block(
                resid[:, n0:n1], norm_kind, norm_weight, norm_bias, norm_eps, W_U, b_U, softcap,
                min(top_k, W_U.shape[1]), target_ids[n0:n1], vocab_chunk, want, fused_step,
            ))
    return {name: torch.cat([b[name] for b in blocks], dim=0 if name == "final_top1" else 1) for name in blocks[0]}


def _lens_block(resid, norm_kind, norm_weight, norm_bias, norm_eps, W_U, b_U, softcap, k, target_ids, vocab_chunk, want, fused_step):
    """All requested reductions for one chunk of tokens: a reference pass, the fused pass, and the
    second pass that Jensen-Shannon and total variation need."""
    rows, n, d_model = resid.shape
    vocab = W_U.shape[1]
    normed = apply_final_norm(resid, norm_kind, norm_weight, norm_bias, norm_eps)
    need_final = bool(want & {"kl_final_row", "kl_row_final", "js_final", "tv_final", "final_top1"})
    need_input = "kl_input_row" in want
    need_own = bool(want & {"entropy", "kl_row_final", "kl_next_row", "js_final"})  # sum e * own logit
    # The reference rows' normalisers come first, with the main pass's tile arithmetic, so that a row
    # compared with itself gives divergences of exactly zero.
    # The fused step computes e only inside its loop, so the neighbour KL (which dots the previous row's
    # e with this row's logits) takes the eager step.
    step = fused_step if fused_step is not None and "kl_next_row" not in want else None
    n_thresholds = ("final_top1" in want) + target_ids.shape[1]
    lse_final, final_top1 = _reference_pass(normed[-1], W_U, b_U, softcap, vocab_chunk, step, n_thresholds)
    lse_input = _reference_pass(normed[0], W_U, b_U, softcap, vocab_chunk, step, n_thresholds)[0] if need_input else None

    columns = [target_ids.long()]
    if "final_top1" in want:
        columns.insert(0, final_top1.unsqueeze(-1))
    ids = torch.cat(columns, dim=-1)  # [n, targets to rank]
    thresholds = _target_logits(normed, W_U, b_U, softcap, ids)  # [rows, n, targets]

    # E_ref[row logit] = sum_v p_ref(v) l_row(v). Without a soft-cap logits are affine in the normed
    # residual, so it is normed_row . (W_U p_ref) + b_U . p_ref: one [tokens, d_model] vector per
    # reference instead of a pass over every row's logits. With a soft-cap it is summed tile by tile.
    affine = softcap is None
    refs = {}  # name -> (log-partition, source row)
    if "kl_final_row" in want:
        refs["final"] = (lse_final, rows - 1)
    if need_input:
        refs["input"] = (lse_input, 0)
    W_p = {name: torch.zeros(n, d_model) for name in refs}
    b_p = {name: torch.zeros(n) for name in refs}
    sum_p_l = {name: torch.zeros(rows, n) for name in refs}

    m = torch.full((rows, n), float("-inf"))
    s = torch.zeros(rows, n)
    sum_e_own = torch.zeros(rows, n)
    sum_e_final = torch.zeros(rows, n)
    sum_e_next = torch.zeros(rows, n)
    counts = torch.zeros(rows, n, ids.shape[1], dtype=torch.long)
    top_vals = torch.full((rows, n, k), float("-inf"))
    top_ids = torch.zeros(rows, n, k, dtype=torch.long)
    width = min(vocab_chunk, vocab)
    exp_buffers = (torch.empty(n, width), torch.empty(n, width))  # this row's and the previous row's
    p_buffers = {name: torch.empty(n, width) for name in refs}
    product = torch.empty(n, width)
    above = torch.empty(n, width, dtype=torch.bool)

    def dot(a, b):  # row-wise dot product through a reused buffer: no 4 MB allocation per tile
        return torch.mul(a, b, out=product[:, : a.shape[1]]).sum(-1)

    for v0 in range(0, vocab, vocab_chunk):
        v1 = min(v0 + vocab_chunk, vocab)
        w = v1 - v0
        W_chunk = W_U[:, v0:v1].float()
        b_chunk = None if b_U is None else b_U[v0:v1].float()
        final_tile = _logit_tile(normed[-1], W_chunk, b_chunk, softcap)
        in_chunk = (ids >= v0) & (ids < v1)
        p_ref = {}
        previous_rescale = None
        for r in range(rows):
            tile = final_tile if r == rows - 1 else _logit_tile(normed[r], W_chunk, b_chunk, softcap)
            if r == 0:  # both references' probabilities for this chunk, before any row needs them
                for name, (lse_ref, source) in refs.items():
                    source_tile = tile if source == 0 else final_tile
                    buffer = p_buffers[name][:, :w]
                    p_ref[name] = _exp_shifted(source_tile, lse_ref, buffer)
                    if affine:
                        W_p[name] += p_ref[name] @ W_chunk.T
                        if b_chunk is not None:
                            b_p[name] += p_ref[name] @ b_chunk
            if step is not None:
                tile_max, m[r], s[r], sum_e_own[r], sum_e_final[r], raw_counts = step(
                    tile, final_tile, m[r], s[r], sum_e_own[r], sum_e_final[r], thresholds[r])
                _merge_counts(raw_counts, tile, thresholds[r], in_chunk, ids, v0, counts[r])
                if not affine:
                    for name in refs:
                        sum_p_l[name][r] += dot(p_ref[name], tile)
                if "top_k" in want:
                    _merge_top_k(tile, tile_max, v0, top_vals[r], top_ids[r])
                continue
            e = exp_buffers[r % 2][:, :w]
            tile_max, m_new, rescale, s[r] = _softmax_update(tile, m[r], s[r], e)
            m[r] = m_new
            if need_own:
                sum_e_own[r] = sum_e_own[r] * rescale + dot(e, tile)
            if "kl_row_final" in want:
                sum_e_final[r] = sum_e_final[r] * rescale + dot(e, final_tile)
            if "kl_next_row" in want and r > 0:
                previous = exp_buffers[(r - 1) % 2][:, :w]
                sum_e_next[r - 1] = sum_e_next[r - 1] * previous_rescale + dot(previous, tile)
            previous_rescale = rescale
            if not affine:
                for name in refs:
                    sum_p_l[name][r] += dot(p_ref[name], tile)
            if "top_k" in want:
                _merge_top_k(tile, tile_max, v0, top_vals[r], top_ids[r])
            _count_above(tile, tile_max, thresholds[r], in_chunk, ids, v0, counts[r], above[:, :w])
    if affine:
        for name in refs:
            sum_p_l[name] = (normed * W_p[name]).sum(-1) + b_p[name]

    lse = m + torch.log(s)
    out = {"log_partition": lse}
    if "top_k" in want:
        out["top_ids"] = top_ids
        out["top_logprobs"] = top_vals - lse.unsqueeze(-1)
    if "entropy" in want:
        out["entropy"] = lse - sum_e_own / s
    for name, key in (("final", "kl_final_row"), ("input", "kl_input_row")):
        if name in refs:
            ref_lse, source = refs[name]
            out[key] = (sum_p_l[name][source] - ref_lse) - (sum_p_l[name] - lse)
    if "kl_row_final" in want:
        out["kl_row_final"] = (sum_e_own - sum_e_final) / s - lse + lse_final
    if "kl_next_row" in want:
        kl_next = (sum_e_own[:-1] - sum_e_next[:-1]) / s[:-1] - lse[:-1] + lse[1:]
        out["kl_next_row"] = torch.cat([kl_next, torch.full((1, n), float("nan"))])
    if want & {"js_final", "tv_final"}:
        out.update(_divergence_pass(normed, W_U, b_U, softcap, vocab_chunk, lse, want))

    logprobs = thresholds - lse.unsqueeze(-1)
    ranks = counts + 1
    valid = (ids >= 0).unsqueeze(0).expand_as(ranks)
    logprobs = torch.where(valid, logprobs, torch.full_like(logprobs, float("nan")))
    ranks = torch.where(valid, ranks, torch.full_like(ranks, -1))
    first = 0
    if "final_top1" in want:
        out.update(final_top1=final_top1, final_top1_logprob=logprobs[..., 0], final_top1_rank=ranks[..., 0])
        first = 1
    if "targets" in want:
        out.update(target_logprobs=logprobs[..., first:], target_ranks=ranks[..., first:])
    return out


def _divergence_pass(normed, W_U, b_U, softcap, vocab_chunk, lse, want):
    """Jensen-Shannon divergence and total variation to the final row. Both need each row's normalised
    probabilities, hence the normalisers from the first pass and a second matmul per tile.
    JS = sum [p log p + q log q] / 2 - sum m log m with m = (p + q) / 2, so a row equal to the final row
    (m == p bitwise) gives exactly 0."""
    rows, n, _ = normed.shape
    vocab = W_U.shape[1]
    js_terms = torch.zeros(rows, n)
    tv = torch.zeros(rows, n)
    for v0 in range(0, vocab, vocab_chunk):
        v1 = min(v0 + vocab_chunk, vocab)
        W_chunk = W_U[:, v0:v1].float()
        b_chunk = None if b_U is None else b_U[v0:v1].float()
        final_tile = _logit_tile(normed[-1], W_chunk, b_chunk, softcap)
        q = _exp_shifted(final_tile, lse[-1], torch.empty_like(final_tile))
        q_log_q = torch.xlogy(q, q)
        for r in range(rows):
            tile = _logit_tile(normed[r], W_chunk, b_chunk, softcap)
            p = _exp_shifted(tile, lse[r], tile)
            if "js_final" in want:
                mix = (p + q) * 0.5
                js_terms[r] += ((torch.xlogy(p, p) + q_log_q) * 0.5 - torch.xlogy(mix, mix)).sum(-1)
            if "tv_final" in want:
                tv[r] += (p - q).abs().sum(-1)
    out = {}
    if "js_final" in want:
        out["js_final"] = js_terms
    if "tv_final" in want:
        out["tv_final"] = tv * 0.5
    return out


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
    """Add, per token and target, how many tile logits lie strictly above the target's logit."""
    for j in range(thresholds.shape[-1]):
        threshold = thresholds[:, j]
        if not bool((tile_max > threshold).any()):
            continue
        torch.gt(tile, threshold.unsqueeze(-1), out=above)
        counts[:, j] += above.view(torch.uint8).sum(-1, dtype=torch.int16)
    _exclude_self(tile, thresholds, in_chunk, ids, v0, counts)


def _merge_counts(raw_counts, tile, thresholds, in_chunk, ids, v0, counts):
    counts += raw_counts
    _exclude_self(tile, thresholds, in_chunk, ids, v0, counts)


def _exclude_self(tile, thresholds, in_chunk, ids, v0, counts):
    """Do not count a target above itself: its tile logit may round a hair above its dot-product logit."""
    for j in range(thresholds.shape[-1]):
        here = torch.nonzero(in_chunk[:, j]).squeeze(-1)
        if here.numel():
            own = tile[here, ids[here, j] - v0]
            counts[here, j] -= (own > thresholds[here, j]).long()


def fused_tile_step(tile, final_tile, m, s, sum_e_own, sum_e_final, thresholds):
    """One online-softmax step over a ``[tokens, vocab chunk]`` tile, written as one expression so that a
    compiler (``torch.compile``) can fuse it into a single loop over the logits: the tile max, the running
    max and sum of ``e = exp(l - max)``, the sums of ``e * l`` and ``e * l_final`` (rescaled to the new
    max), and how many logits lie strictly above each threshold. Eager, it makes one pass per quantity."""
    tile_max = tile.amax(-1)
    m_new = torch.maximum(m, tile_max)
    rescale = torch.exp(m - m_new)
    e = torch.exp((tile - m_new.unsqueeze(-1)).clamp_min(EXP_FLOOR))
    s = s * rescale + e.sum(-1)
    sum_e_own = sum_e_own * rescale + (e * tile).sum(-1)
    sum_e_final = sum_e_final * rescale + (e * final_tile).sum(-1)
    counts = [(tile > thresholds[:, j : j + 1]).sum(-1) for j in range(thresholds.shape[-1])]
    counts = torch.stack(counts, -1) if counts else torch.zeros(tile.shape[0], 0, dtype=torch.long)
    return tile_max, m_new, s, sum_e_own, sum_e_final, counts
