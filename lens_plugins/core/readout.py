"""Streamed decoding of a residual stack into lens statistics, tile by tile.

This module is the part of lens_plugins that runs where the activations live: on the
caller's machine for a TransformerLens cache, on the NDIF server for a remote nnsight
trace. It therefore imports nothing but torch, takes every input as an argument
(tensors, numbers, strings) and carries no decorators: nnsight ships these functions
by source and rebuilds them without their module's globals or type checkers.

The cost of a full logit lens is the unembedding, ``rows x tokens x d_model x vocab``
multiply-adds, and then every statistic wants another pass over the same logits.
``lens_statistics`` treats the stack ``[rows, tokens, d_model]`` as one matrix of
``rows x tokens`` vectors and produces its logits one tile (a block of tokens with all
their rows, by a chunk of the vocabulary) at a time: one matmul per tile, so that each
``W_U`` chunk is reused by ``M = rows x block`` vectors while it is in cache (a per-row
matmul re-reads all of ``W_U`` for every row), and every reduction is one vectorised op
over the whole tile. Each tile is consumed while it is still hot, with an online softmax
(running max, running sums of ``e`` and ``e*l``), a merged running top-k and running rank
counts, so that no ``[rows, tokens, vocab]`` tensor ever exists.

Conventions: the last row of the stack is the reference ("final") distribution that
the KL divergences and the final top-1 refer to; ranks are ``1 + #{v != t : l_v > l_t}``
(ties share the best rank); every statistic is computed and returned in float32.
"""

import torch

from lens_plugins.core.reductions import READOUT, TABLE

NO_TARGET = -1  # a target id that means "nothing to score here" (e.g. the last position's next token)
# Shifted logits are clamped here before exp: below about -87.3, float32 exp is subnormal, which torch's
# vectorised exp computes some 70x slower (measured: 33 ms vs 0.46 ms per million). exp(-87) = 1.6e-38 is
# negligible in any sum it joins (a normaliser is >= 1), so the clamp changes no reported digit.
EXP_FLOOR = -87.0
# How the unembedding matmul is computed; every statistic is float32 whichever is chosen.
#   float32: exact float32 (the default).
#   tf32:    CUDA tensor cores with TF32 inputs (10-bit mantissa), float32 accumulation.
#   bf16x3:  each float32 operand split into bfloat16 hi + lo parts, hi*hi + hi*lo + lo*hi with float32
#            accumulation (about 16 mantissa bits; the lo*hi term vanishes when W_U is already bfloat16).
PRECISIONS = ("float32", "tf32", "bf16x3")
# Tile sizes when the caller gives none, by where W_U lives. A CPU wants M = rows x tokens per tile large
# enough that each W_U chunk is reused from cache by many vectors, and tiles that fit the last-level cache; a
# GPU wants few, large tiles (every tile costs a few dozen kernel launches).
CPU_TILE_VECTORS, CPU_VOCAB_CHUNK = 1024, 4096
GPU_TILE_ELEMENTS, GPU_VOCAB_CHUNK = 2**27, 16384


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


def tile_sizes(device, rows, tokens, vocab):
    """``(vocab_chunk, token_chunk)`` for a stack of ``rows x tokens`` vectors decoded on ``device``: about
    ``CPU_TILE_VECTORS`` vectors by ``CPU_VOCAB_CHUNK`` columns on a CPU, ``GPU_TILE_ELEMENTS`` logits per tile
    on a GPU; token blocks of equal size, so that no small remainder tile costs a pass of its own."""
    if device.type == "cpu":
        vocab_chunk, vectors = min(CPU_VOCAB_CHUNK, vocab), CPU_TILE_VECTORS
    else:
        vocab_chunk = min(GPU_VOCAB_CHUNK, vocab)
        vectors = GPU_TILE_ELEMENTS // vocab_chunk
    blocks = -(-rows * tokens // max(vectors, rows))
    return vocab_chunk, max(1, -(-tokens // blocks))


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
    vocab_chunk=None,
    token_chunk=None,
    reductions=None,
    precision="float32",
):
    """Decode every row of ``resid [rows, tokens, d_model]`` and reduce it on the fly.

    ``W_U`` is ``[d_model, vocab]``; ``target_ids [tokens, T]`` holds token ids to score at each token
    (``NO_TARGET`` where there is none). Row 0 is the input row (the embeddings), the last row the
    reference ("final"). Returns float32 / int64 tensors, ``[rows, tokens]`` unless noted, for the
    requested ``reductions`` (default ``DEFAULT_REDUCTIONS``):

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

    A tile is ``token_chunk`` tokens (with all their rows) by ``vocab_chunk`` vocabulary entries; ``None``
    picks sizes for the device ``W_U`` lives on (``tile_sizes``). Extra memory is a few tile-sized buffers,
    ``O(rows x token_chunk x vocab_chunk)``, independent of the vocabulary and of the number of tokens; the
    results do not depend on either chunk size beyond float rounding (ids and ranks not at all).
    ``precision`` (``PRECISIONS``) says how the unembedding matmul is computed.
    """
    reductions = DEFAULT_REDUCTIONS if reductions is None else reductions
    unknown = [name for name in reductions if name not in REDUCTIONS]
    if unknown:
        raise ValueError(f"unknown reductions {unknown}; choose from {list(REDUCTIONS)}")
    device = W_U.device  # work where the unembedding lives (on a multi-GPU server, the last layer's device)
    check_precision(precision, device)
    rows, tokens, _ = resid.shape
    auto_vocab, auto_tokens = tile_sizes(device, rows, tokens, W_U.shape[1])
    vocab_chunk = auto_vocab if vocab_chunk is None else vocab_chunk
    token_chunk = auto_tokens if token_chunk is None else token_chunk
    if vocab_chunk < 1 or token_chunk < 1:
        raise ValueError(f"chunk sizes must be positive, got vocab_chunk={vocab_chunk}, token_chunk={token_chunk}")
    if vocab_chunk > 32767:
        raise ValueError(f"vocab_chunk={vocab_chunk} exceeds 32767, the largest tile the int16 rank counter holds")
    want = set(reductions)
    resid = resid.to(device)
    target_ids = target_ids.to(device)
    if "targets" not in want:
        target_ids = target_ids[:, :0]
    unembedding = Unembedding(W_U, b_U, softcap, precision)
    blocks = []
    previous_tf32 = _allow_tf32(precision == "tf32")
    try:
        with torch.device(device):  # every buffer below is allocated next to W_U; results stay there too
            for n0 in range(0, tokens, token_chunk):
                n1 = min(n0 + token_chunk, tokens)
                normed = apply_final_norm(resid[:, n0:n1], norm_kind, norm_weight, norm_bias, norm_eps)
                blocks.append(_lens_block(normed, unembedding, min(top_k, W_U.shape[1]), target_ids[n0:n1],
                                          vocab_chunk, want))
    finally:
        _allow_tf32(previous_tf32)
    return {name: torch.cat([b[name] for b in blocks], dim=0 if name == "final_top1" else 1) for name in blocks[0]}


def check_precision(precision, device):
    """Refuse an unknown precision, and TF32 anywhere but CUDA (it is a tensor-core format)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError(
            f"precision='tf32' needs W_U on a CUDA device (TF32 is an NVIDIA tensor-core format), but it is on "
            f"{device.type}: use precision='float32' (exact) or 'bf16x3' (split bfloat16, any device)"
        )


def _allow_tf32(allow):
    """Set whether CUDA float32 matmuls may use TF32; returns the previous setting, to restore."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    if allow != previous:
        matmul.allow_tf32 = allow
    return previous


def _split_bf16(x):
    """``x`` as bfloat16 ``(hi, lo)`` with ``hi + lo`` about 16 mantissa bits of ``x``; ``lo`` is ``None`` when
    ``x`` is already bfloat16 (nothing left over)."""
    if x.dtype == torch.bfloat16:
        return x, None
    x = x.float()
    hi = x.bfloat16()
    return hi, (x - hi.float()).bfloat16()


def _bf16_matmul(a, b):
    """``a @ b`` of bfloat16 operands with float32 output and accumulation: a CUDA tensor-core matmul where
    torch offers one (``out_dtype``), elsewhere the same numbers by a float32 matmul (a product of two
    bfloat16 values is exact in float32)."""
    if a.device.type == "cuda":
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return a.float() @ b.float()


class Unembedding:
    """``W_U`` (+ ``b_U``, soft-cap) at a precision, producing float32 logit tiles: ``chunk(v0, v1)`` prepares
    a vocabulary chunk once, ``logits(normed, chunk, out)`` writes the logits of ``normed [M, d]`` into
    ``out [M, chunk width]``. The same call on the same vectors gives the same bits, which is what lets a
    reference row match itself exactly."""

    def __init__(self, W_U, b_U, softcap, precision):
        self.W_U, self.b_U, self.softcap, self.precision = W_U, b_U, softcap, precision

    def chunk(self, v0, v1):
        W = self.W_U[:, v0:v1]
        b = None if self.b_U is None else self.b_U[v0:v1].float()
        if self.precision == "bf16x3":
            hi, lo = _split_bf16(W)
            if W.device.type != "cuda":  # the float32 emulation: convert once per chunk, not once per matmul
                hi, lo = hi.float(), None if lo is None else lo.float()
            return hi, lo, b
        return W.float(), None, b

    def operand(self, normed):
        """``normed`` as the matmul wants it: float32, or its bfloat16 split."""
        if self.precision != "bf16x3":
            return normed
        hi, lo = _split_bf16(normed)
        if normed.device.type != "cuda":
            hi, lo = hi.float(), lo.float()
        return hi, lo

    def logits(self, a, chunk, out):
        W, W_lo, b = chunk
        if self.precision != "bf16x3":
            torch.matmul(a, W, out=out)
        else:  # small terms first, then the large one
            hi, lo = a
            out.copy_(_bf16_matmul(lo, W))
            if W_lo is not None:
                out += _bf16_matmul(hi, W_lo)
            out += _bf16_matmul(hi, W)
        if b is not None:
            out += b
        if self.softcap is not None:
            torch.tanh(out.div_(self.softcap), out=out).mul_(self.softcap)
        return out

    def weighted_rows(self, p, chunk):
        """``p [n, chunk width] @ W_chunk.T``: a probability-weighted sum of unembedding vectors, in float32."""
        W, W_lo, _ = chunk
        W = W.float() if W_lo is None else W.float() + W_lo.float()
        return p @ W.T


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


class _Buffer:
    """Flat storage for tiles of up to ``size`` elements, handed out as contiguous views of any shape (the last
    vocabulary chunk is narrower), so that no tile allocates: a fresh multi-megabyte tensor costs page faults."""

    def __init__(self, size, dtype=torch.float32):
        self.storage = torch.empty(size, dtype=dtype)

    def view(self, *shape):
        numel = 1
        for dim in shape:
            numel *= dim
        return self.storage[:numel].view(shape)


class _Tiles:
    """The logits of one token block, ``[rows, n, chunk width]``, tile by tile, each from one matmul over all
    ``rows x n`` vectors. With ``split_final`` the final row is a matmul of its own, the very call that
    ``final_argmax`` makes, so the final top-1 found before the main pass is bitwise the argmax of the final
    row's logits in it."""

    def __init__(self, normed, unembedding, vocab_chunk, split_final):
        self.rows, self.n, d = normed.shape
        self.unembedding, self.vocab_chunk, self.vocab = unembedding, vocab_chunk, unembedding.W_U.shape[1]
        self.width = min(vocab_chunk, self.vocab)
        self.split_final = split_final
        self.final = unembedding.operand(normed[-1])
        self.all = unembedding.operand(normed[:-1].reshape(-1, d) if split_final else normed.reshape(-1, d))
        self.buffer = _Buffer(self.rows * self.n * self.width)

    def chunks(self):
        for v0 in range(0, self.vocab, self.vocab_chunk):
            v1 = min(v0 + self.vocab_chunk, self.vocab)
            yield v0, v1 - v0, self.unembedding.chunk(v0, v1)

    def __iter__(self):
        """``(v0, chunk, tile)`` for every vocabulary chunk; ``tile`` is a view of one reused buffer."""
        for v0, w, chunk in self.chunks():
            tile = self.buffer.view(self.rows, self.n, w)
            if self.split_final:
                self.unembedding.logits(self.all, chunk, tile[:-1].view(-1, w))
                self.unembedding.logits(self.final, chunk, tile[-1])
            else:
                self.unembedding.logits(self.all, chunk, tile.view(-1, w))
            yield v0, chunk, tile

    def final_argmax(self):
        """The final row's argmax ``[n]`` over the whole vocabulary, from the main pass's own final-row matmul."""
        best = torch.full((self.n,), float("-inf"))
        best_id = torch.zeros(self.n, dtype=torch.long)
        for v0, w, chunk in self.chunks():
            final = self.buffer.view(self.rows, self.n, w)[-1]  # where the main pass puts it: the very same call
            value, index = self.unembedding.logits(self.final, chunk, final).max(-1)
            better = value > best
            best = torch.where(better, value, best)
            best_id = torch.where(better, index + v0, best_id)
        return best_id


# Every reduction the readout can compute, each opt-in by name (a remote trace computes and downloads
# only what was asked for), and the result fields each fills: ``lens_plugins.core.reductions.TABLE``.
# ``log_partition`` (logsumexp of each row's logits) always comes back: every log-prob is a logit minus it.
REDUCTIONS = READOUT
DEFAULT_REDUCTIONS = tuple(name for name in READOUT if TABLE[name]["default"]) + ("targets",)


def _lens_block(normed, unembedding, k, target_ids, vocab_chunk, want):
    """All requested reductions for one block of tokens ``normed [rows, n, d_model]`` (already through the
    final norm): one pass over the vocabulary, after a pass over the final row alone when the final top-1's
    ranks are wanted (every row's count needs its threshold from the start), and before the second pass that
    Jensen-Shannon and total variation need.

    The reference rows (final, input) are rows of the same tiles, so a row compared with itself gives
    divergences of exactly zero. KL(ref || row) needs ``E_ref[l_row]``: the reference's ``e = exp(l - m)``
    is accumulated online with the running max, and without a soft-cap logits are affine in the normed
    residual, so ``sum_v e_ref(v) l_row(v) = normed_row . (W_U e_ref) + b_U . e_ref``: one ``[n, d_model]``
    vector per reference instead of a pass over every row's logits. With a soft-cap it is summed per tile.
    """
    rows, n, d_model = normed.shape
    W_U, b_U, softcap = unembedding.W_U, unembedding.b_U, unembedding.softcap
    tiles = _Tiles(normed, unembedding, vocab_chunk, split_final="final_top1" in want)
    columns = [target_ids.long()]
    final_top1 = None
    if "final_top1" in want:
        final_top1 = tiles.final_argmax()
        columns.insert(0, final_top1.unsqueeze(-1))
    ids = torch.cat(columns, dim=-1)  # [n, targets to rank]
    thresholds = _target_logits(normed, W_U, b_U, softcap, ids)  # [rows, n, targets]

    affine = softcap is None
    refs = {}  # name -> source row
    if "kl_final_row" in want:
        refs["final"] = rows - 1
    if "kl_input_row" in want:
        refs["input"] = 0
    ref_W = {name: torch.zeros(n, d_model) for name in refs}  # sum_v e_ref(v) W_U[:, v]
    ref_b = {name: torch.zeros(n) for name in refs}  # sum_v e_ref(v) b_U[v]
    ref_l = {name: torch.zeros(rows, n) for name in refs}  # sum_v e_ref(v) l_row(v) (soft-capped)

    m = torch.full((rows, n), float("-inf"))
    s = torch.zeros(rows, n)
    sum_e_own = torch.zeros(rows, n) if want & {"entropy", "kl_row_final", "kl_next_row"} else None
    sum_e_final = torch.zeros(rows - 1, n) if "kl_row_final" in want else None
    sum_e_next = torch.zeros(rows - 1, n) if "kl_next_row" in want else None
    counts = torch.zeros(rows, n, ids.shape[1], dtype=torch.int32)  # per tile: float sums, exact below 2^24
    top_vals = torch.full((rows * n, k), float("-inf"))
    top_ids = torch.zeros(rows * n, k, dtype=torch.long)
    size = tiles.buffer.storage.numel()
    e_buffer, product = _Buffer(size), _Buffer(size)

    def dot(a, b):  # row-wise dot product over the last dim, through a reused buffer
        return torch.mul(a, b, out=product.view(*torch.broadcast_shapes(a.shape, b.shape))).sum(-1)

    for v0, chunk, tile in tiles:
        e = e_buffer.view(*tile.shape)
        group = _group_size(tile.shape[-1])
        group_max = tile.view(rows * n, -1, group).amax(-1) if group else None  # [vectors, groups]
        tile_max = tile.amax(-1) if group is None else group_max.amax(-1).view(rows, n)
        m_new = torch.maximum(m, tile_max)
        rescale = torch.exp(m - m_new)
        torch.sub(tile, m_new.unsqueeze(-1), out=e)
        torch.exp(e.clamp_(min=EXP_FLOOR), out=e)
        s = s * rescale + e.sum(-1)
        if sum_e_own is not None:
            sum_e_own = sum_e_own * rescale + dot(e, tile)
        if sum_e_final is not None:
            sum_e_final = sum_e_final * rescale[:-1] + dot(e[:-1], tile[-1])
        if sum_e_next is not None:
            sum_e_next = sum_e_next * rescale[:-1] + dot(e[:-1], tile[1:])
        for name, source in refs.items():
            ref_e, ref_rescale = e[source], rescale[source]
            if affine:
                ref_W[name] = ref_W[name] * ref_rescale.unsqueeze(-1) + unembedding.weighted_rows(ref_e, chunk)
                if b_U is not None:
                    ref_b[name] = ref_b[name] * ref_rescale + ref_e @ chunk[2]
            else:
                ref_l[name] = ref_l[name] * ref_rescale + dot(tile, ref_e)
        _count_above(tile, tile_max, thresholds, ids, v0, counts, product.view(*tile.shape))
        if "top_k" in want:
            _merge_top_k(tile.view(rows * n, -1), tile_max.view(-1), group_max, v0, top_vals, top_ids)
        m = m_new

    lse = m + torch.log(s)
    out = {"log_partition": lse}
    if "top_k" in want:
        out["top_ids"] = top_ids.view(rows, n, k)
        out["top_logprobs"] = top_vals.view(rows, n, k) - lse.unsqueeze(-1)
    if "entropy" in want:
        out["entropy"] = lse - sum_e_own / s
    for name, key in (("final", "kl_final_row"), ("input", "kl_input_row")):
        if name in refs:
            source = refs[name]
            if affine:  # E_ref[l_row] = normed_row . (W_U p_ref) + b_U . p_ref
                expected = ((normed * ref_W[name]).sum(-1) + ref_b[name]) / s[source]
            else:
                expected = ref_l[name] / s[source]
            out[key] = (expected[source] - lse[source]) - (expected - lse)
    if "kl_row_final" in want:  # the final row's own cross term is its own sum: exactly zero against itself
        cross = torch.cat([sum_e_final, sum_e_own[-1:]])
        out["kl_row_final"] = (sum_e_own - cross) / s - lse + lse[-1]
    if "kl_next_row" in want:
        kl_next = (sum_e_own[:-1] - sum_e_next) / s[:-1] - lse[:-1] + lse[1:]
        out["kl_next_row"] = torch.cat([kl_next, torch.full((1, n), float("nan"))])
    if want & {"js_final", "tv_final"}:
        out.update(_divergence_pass(tiles, lse, want))

    logprobs = thresholds - lse.unsqueeze(-1)
    ranks = counts.long() + 1
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


def _divergence_pass(tiles, lse, want):
    """Jensen-Shannon divergence and total variation to the final row. Both need each row's normalised
    probabilities, hence the normalisers from the first pass and a second matmul per tile.
    JS = sum [p log p + q log q] / 2 - sum m log m with m = (p + q) / 2, so a row equal to the final row
    (m == p bitwise) gives exactly 0."""
    rows, n = lse.shape
    js_terms = torch.zeros(rows, n)
    tv = torch.zeros(rows, n)
    for _, _, tile in tiles:
        p = torch.exp(torch.sub(tile, lse.unsqueeze(-1), out=tile).clamp_(min=EXP_FLOOR), out=tile)
        q = p[-1]
        if "js_final" in want:
            mix = (p + q) * 0.5
            q_log_q = torch.xlogy(q, q)
            js_terms += ((torch.xlogy(p, p) + q_log_q) * 0.5 - torch.xlogy(mix, mix)).sum(-1)
        if "tv_final" in want:
            tv += (p - q).abs().sum(-1)
    out = {}
    if "js_final" in want:
        out["js_final"] = js_terms
    if "tv_final" in want:
        out["tv_final"] = tv * 0.5
    return out


def _group_size(width):
    """Width of the groups a tile's rows are cut into for the top-k (a power of two from 8 to 64 that divides
    ``width``), or ``None`` when none does: then the top-k reads whole rows."""
    for group in (64, 32, 16, 8):
        if width % group == 0 and width >= 4 * group:
            return group
    return None


def _merge_top_k(tile, tile_max, group_max, v0, top_vals, top_ids):
    """Merge a tile ``[vectors, width]`` into a running top-k, touching only the vectors whose tile max
    beats their k-th best. With ``group_max [vectors, groups]`` (the max of each group of consecutive
    columns) only the k groups with the largest maxima are read: they hold the k largest values (any other
    group's max has k larger values above it), so the top-k costs a small gather instead of a pass."""
    k = top_vals.shape[-1]
    beat = tile_max > top_vals[:, -1]
    rows = None if bool(beat.all()) else torch.nonzero(beat).squeeze(-1)
    if rows is not None and rows.numel() == 0:
        return
    n_groups = 0 if group_max is None else group_max.shape[-1]
    if n_groups > k:
        width = tile.shape[-1] // n_groups
        maxima = group_max if rows is None else group_max.index_select(0, rows)
        groups = maxima.topk(k, dim=-1).indices  # [chosen, k]
        vectors = torch.arange(tile.shape[0], device=tile.device) if rows is None else rows
        columns = (groups.unsqueeze(-1) * width + torch.arange(width, device=tile.device)).flatten(1)  # [chosen, k*w]
        candidates = tile.view(-1)[(vectors.unsqueeze(-1) * tile.shape[-1] + columns)]
        vals, where = candidates.topk(k, dim=-1)
        idx = columns.gather(-1, where)
    else:
        candidates = tile if rows is None else tile.index_select(0, rows)
        vals, idx = candidates.topk(min(k, tile.shape[-1]), dim=-1)
    if rows is None:
        merged_vals, merged_ids = torch.cat([top_vals, vals], dim=-1), torch.cat([top_ids, idx + v0], dim=-1)
        best_vals, order = merged_vals.topk(k, dim=-1)
        top_vals.copy_(best_vals)
        top_ids.copy_(merged_ids.gather(-1, order))
        return
    merged_vals = torch.cat([top_vals.index_select(0, rows), vals], dim=-1)
    merged_ids = torch.cat([top_ids.index_select(0, rows), idx + v0], dim=-1)
    best_vals, order = merged_vals.topk(k, dim=-1)
    top_vals[rows] = best_vals
    top_ids[rows] = merged_ids.gather(-1, order)


def _count_above(tile, tile_max, thresholds, ids, v0, counts, above):
    """Add, per row, token and target, how many tile logits lie strictly above the target's logit
    (``thresholds [rows, n, targets]``), not counting the target itself: its tile logit may round a hair
    above its dot-product logit. ``above`` is a float buffer of the tile's shape: comparing into floats and
    summing them is faster than summing booleans, and exact (a tile holds fewer than 2^24 columns)."""
    w = tile.shape[-1]
    for j in range(thresholds.shape[-1]):
        threshold = thresholds[..., j]
        if bool((tile_max > threshold).any()):
            counts[..., j] += torch.gt(tile, threshold.unsqueeze(-1), out=above).sum(-1).int()
        here = torch.nonzero((ids[:, j] >= v0) & (ids[:, j] < v0 + w)).squeeze(-1)
        if here.numel():
            own = tile[:, here, ids[here, j] - v0]  # [rows, tokens here]
            counts[:, here, j] -= (own > threshold[:, here]).int()
