"""KL divergence and cross-entropy over the vocabulary, with their gradient, tile by tile.

Training a lens means back-propagating a loss over the whole vocabulary from every row. The straightforward
step materialises ``[tokens, vocab]`` logits, their log-softmax and the reference's, and keeps them for the
backward pass: at 16,384 tokens and SmolLM2's 49,152-token vocabulary that is 3.2 GB per tensor. Here the
logits exist one ``token_chunk x vocab_chunk`` tile at a time. Each tile is consumed while hot by an online
softmax (running max, running sum of ``e = exp(l - max)``) and, when a gradient is wanted, by the running sum
``sum_v e_v W_v``; since ``d log Z / d h = sum_v q_v W_v`` and the loss is a scalar per token, the gradient of
every token's loss is known at the end of the same pass. ``_TiledLoss`` keeps it (``[tokens, d_model]``) for
the backward pass, which only scales it: no tile is recomputed and none is stored, so a step costs two matmuls
per tile (logits, gradient), where a backward that recomputed each tile would cost three.

KL(final || lens) needs the reference distribution ``p`` per token. Without logit soft-capping the lens logits
are affine in the normed residual ``h``, so ``sum_v p_v l_v = h . (W_U p) + b_U . p``: one pass over the
reference (``reference_summary``, shared by every row) gives ``W_U p`` ``[tokens, d_model]`` and the main pass
needs no reference tile. With soft-capping (Gemma 2/3) each tile of ``p`` is recomputed from the reference's
normed residual instead.

Like every core module: imports only torch, everything as arguments, no decorators.
"""

import torch

from lens_plugins.core.errors import LensValueError
from lens_plugins.core.readout import EXP_FLOOR


def _logits(normed, W_U, b_U, softcap, v0, v1):
    """One tile of float32 logits and, with soft-capping, ``dl/dz`` (``None`` without). ``normed`` and
    ``W_U`` are already in the matmul dtype."""
    z = (normed @ W_U[:, v0:v1]).float()
    if b_U is not None:
        z = z + b_U[v0:v1].float()
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return softcap * t, 1.0 - t * t


def _column_logits(normed, W_U, b_U, softcap, ids):
    """Logit of ``ids[n]`` at token ``n`` (d_model dot products) and its ``dl/dz`` (``None`` without cap)."""
    columns = W_U.T[ids].float()  # [tokens, d]
    z = (normed * columns).sum(-1)
    if b_U is not None:
        z = z + b_U[ids].float()
    if softcap is None:
        return z, None, columns
    t = torch.tanh(z / softcap)
    return softcap * t, 1.0 - t * t, columns


def reference_summary(ref_normed, decoder, vocab_chunk=4096, token_chunk=1024, matmul_dtype=torch.float32):
    """What KL(reference || lens) needs of the reference distribution ``p = softmax(decode(ref_normed))``
    (``decoder``: a ``readout.DecoderTensors``, whose unembedding decodes the already-normed residuals),
    per token: ``log_partition`` and ``neg_entropy`` (``sum_v p_v log p_v``), and, without soft-capping,
    ``mean_unembed`` (``W_U p``, ``[tokens, d_model]``) and ``mean_bias`` (``b_U . p``). With soft-capping it
    keeps ``ref_normed`` instead, for the main pass to rebuild ``p`` tile by tile. Computed without grad.
    ``matmul_dtype`` is the dtype of the logit and gradient matmuls (``torch.bfloat16`` is about 3x faster on
    CPUs with bfloat16 units, at about 3 significant digits per logit); everything else is float32."""
    W_U, b_U, softcap = decoder.W_U, decoder.b_U, decoder.softcap
    with torch.no_grad():
        ref_normed = ref_normed.float()
        device = ref_normed.device
        W_mm = W_U.detach().to(matmul_dtype)
        n, d = ref_normed.shape
        vocab = W_U.shape[1]
        linear = softcap is None
        log_partition = torch.empty(n, device=device)
        neg_entropy = torch.empty(n, device=device)
        mean_unembed = torch.empty(n, d, device=device) if linear else None
        mean_bias = torch.zeros(n, device=device) if linear else None
        for t0 in range(0, n, token_chunk):
            h = ref_normed[t0:t0 + token_chunk]
            h_mm = h.to(matmul_dtype)
            m = torch.full((h.shape[0],), float("-inf"), device=device)
            s = torch.zeros(h.shape[0], device=device)
            el = torch.zeros(h.shape[0], device=device)  # running sum of e * l
            ew = torch.zeros(h.shape[0], d, device=device) if linear else None
            eb = torch.zeros(h.shape[0], device=device) if linear and b_U is not None else None
            for v0 in range(0, vocab, vocab_chunk):
                v1 = min(v0 + vocab_chunk, vocab)
                tile, _ = _logits(h_mm, W_mm, b_U, softcap, v0, v1)
                m_new = torch.maximum(m, tile.amax(-1))
                rescale = torch.exp(m - m_new)
                e = torch.exp((tile - m_new.unsqueeze(-1)).clamp_(min=EXP_FLOOR))
                s = s * rescale + e.sum(-1)
                el = el * rescale + (e * tile).sum(-1)
                if linear:
                    ew = ew * rescale.unsqueeze(-1) + (e.to(matmul_dtype) @ W_mm[:, v0:v1].T).float()
                    if eb is not None:
                        eb = eb * rescale + e @ b_U[v0:v1].float()
                m = m_new
            logz = m + torch.log(s)
            log_partition[t0:t0 + h.shape[0]] = logz
            neg_entropy[t0:t0 + h.shape[0]] = el / s - logz
            if linear:
                mean_unembed[t0:t0 + h.shape[0]] = ew / s.unsqueeze(-1)
                if eb is not None:
                    mean_bias[t0:t0 + h.shape[0]] = eb / s
    summary = {"log_partition": log_partition, "neg_entropy": neg_entropy}
    if linear:
        summary["mean_unembed"] = mean_unembed
        summary["mean_bias"] = mean_bias
    else:
        summary["ref_normed"] = ref_normed.detach()
    summary["matmul_dtype"] = matmul_dtype
    return summary


def _pass(normed, W_U, b_U, softcap, kind, target, vocab_chunk, token_chunk, want_grad, matmul_dtype):
    """Per-token loss ``[tokens]`` and, if ``want_grad``, its gradient ``[tokens, d_model]`` w.r.t. ``normed``.

    ``kind`` is ``"kl"`` (``target``: a ``reference_summary``) or ``"ce"`` (``target``: token ids).
    """
    n, d = normed.shape
    vocab = W_U.shape[1]
    device = normed.device
    loss = torch.empty(n, device=device)
    log_partition = torch.empty(n, device=device)
    grad = torch.empty(n, d, device=device) if want_grad else None
    linear = softcap is None
    W_mm = W_U.to(matmul_dtype)  # callers that loop over rows pass W_U already cast: then this is free
    for t0 in range(0, n, token_chunk):
        t1 = min(t0 + token_chunk, n)
        h = normed[t0:t1]
        h_mm = h.to(matmul_dtype)
        m = torch.full((t1 - t0,), float("-inf"), device=device)
        s = torch.zeros(t1 - t0, device=device)
        eg = torch.zeros(t1 - t0, d, device=device) if want_grad else None  # running sum of e * dl/dz * W_v
        cross = torch.zeros(t1 - t0, device=device)  # KL with soft-capping: running sum of p * l
        pg = torch.zeros(t1 - t0, d, device=device) if want_grad and kind == "kl" and not linear else None
        if kind == "kl" and not linear:
            ref_h = target["ref_normed"][t0:t1].to(matmul_dtype)
            ref_logz = target["log_partition"][t0:t1].unsqueeze(-1)
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            tile, slope = _logits(h_mm, W_mm, b_U, softcap, v0, v1)
            w_t = W_mm[:, v0:v1].T
            if kind == "kl" and not linear:
                ref_tile, _ = _logits(ref_h, W_mm, b_U, softcap, v0, v1)
                p = torch.exp(ref_tile - ref_logz)
                cross = cross + (p * tile).sum(-1)
                if want_grad:
                    pg = pg + ((p * slope).to(matmul_dtype) @ w_t).float()
            m_new = torch.maximum(m, tile.amax(-1))
            rescale = torch.exp(m - m_new)
            e = tile.sub_(m_new.unsqueeze(-1)).clamp_(min=EXP_FLOOR).exp_()  # in place: the tile is spent
            s = s * rescale + e.sum(-1)
            if want_grad:
                eg = eg * rescale.unsqueeze(-1) + ((e if slope is None else e.mul_(slope)).to(matmul_dtype) @ w_t).float()
            m = m_new
        logz = m + torch.log(s)
        log_partition[t0:t1] = logz
        if kind == "kl":
            if linear:
                cross = (h * target["mean_unembed"][t0:t1]).sum(-1) + target["mean_bias"][t0:t1]
            loss[t0:t1] = target["neg_entropy"][t0:t1] - cross + logz
            if want_grad:
                grad[t0:t1] = eg / s.unsqueeze(-1) - (target["mean_unembed"][t0:t1] if linear else pg)
        else:
            ids = target[t0:t1]
            z_t, slope_t, columns = _column_logits(h, W_U, b_U, softcap, ids)
            loss[t0:t1] = logz - z_t
            if want_grad:
                g_t = columns if slope_t is None else columns * slope_t.unsqueeze(-1)
                grad[t0:t1] = eg / s.unsqueeze(-1) - g_t
    return loss, grad, log_partition


def _forward(ctx, normed, W_U, b_U, softcap, kind, target, vocab_chunk, token_chunk, matmul_dtype):
    want_grad = ctx.needs_input_grad[0]
    loss, grad, _ = _pass(normed.detach().float(), W_U.detach(), None if b_U is None else b_U.detach(), softcap,
                       kind, target, vocab_chunk, token_chunk, want_grad, matmul_dtype)
    if want_grad:
        ctx.save_for_backward(grad)
    return loss


def _backward(ctx, grad_loss):
    (grad,) = ctx.saved_tensors
    return (grad_loss.unsqueeze(-1) * grad, None, None, None, None, None, None, None, None)


class _TiledLoss(torch.autograd.Function):
    """Per-token vocabulary loss whose gradient (w.r.t. the normed residual only: the decoder is frozen) is
    computed in the forward pass, tile by tile, and scaled in the backward pass."""

    forward = staticmethod(_forward)
    backward = staticmethod(_backward)


def _check(normed, W_U, vocab_chunk, token_chunk):
    if normed.dim() != 2 or normed.shape[-1] != W_U.shape[0]:
        raise LensValueError(f"normed residuals must be [tokens, d_model={W_U.shape[0]}], got {tuple(normed.shape)}")
    if vocab_chunk < 1 or token_chunk < 1:
        raise LensValueError(f"vocab_chunk and token_chunk must be positive, got {vocab_chunk} and {token_chunk}")


def kl_divergence(normed, reference, decoder, vocab_chunk=4096, token_chunk=1024):
    """KL(reference || lens) per token, ``[tokens]``, differentiable w.r.t. ``normed`` (``[tokens, d_model]``,
    the lens's residual after the final norm); ``reference`` is ``reference_summary`` of the same tokens, whose
    ``matmul_dtype`` this pass uses too. Only ``decoder``'s unembedding is used (``normed`` is past the norm);
    a caller looping over rows may pass it with ``W_U`` already in the matmul dtype, to cast once."""
    W_U, b_U, softcap = decoder.W_U, decoder.b_U, decoder.softcap
    _check(normed, W_U, vocab_chunk, token_chunk)
    if reference["log_partition"].shape[0] != normed.shape[0]:
        raise LensValueError(f"the reference summarises {reference['log_partition'].shape[0]} tokens, the lens "
                         f"residuals are {normed.shape[0]}: build reference_summary from the same tokens")
    return _TiledLoss.apply(normed, W_U, b_U, softcap, "kl", reference, vocab_chunk, token_chunk,
                            reference["matmul_dtype"])


def cross_entropy(normed, target_ids, decoder, vocab_chunk=4096, token_chunk=1024, matmul_dtype=torch.float32):
    """``-log q(target)`` per token, ``[tokens]``, differentiable w.r.t. ``normed``; ``target_ids`` ``[tokens]``
    must all be valid ids (shift and drop positions without a next token before calling)."""
    W_U, b_U, softcap = decoder.W_U, decoder.b_U, decoder.softcap
    _check(normed, W_U, vocab_chunk, token_chunk)
    if target_ids.shape != normed.shape[:1]:
        raise LensValueError(f"target_ids must be [tokens={normed.shape[0]}], got {tuple(target_ids.shape)}")
    if target_ids.numel() and (int(target_ids.min()) < 0 or int(target_ids.max()) >= W_U.shape[1]):
        raise LensValueError(f"target ids must lie in 0..{W_U.shape[1] - 1}; drop positions without a target first")
    return _TiledLoss.apply(normed, W_U, b_U, softcap, "ce", target_ids.long(), vocab_chunk, token_chunk,
                            matmul_dtype)


def kl_and_cross_entropy(normed, reference, target_ids, decoder, vocab_chunk=4096, token_chunk=1024):
    """``(kl, ce)`` per token without grad, from one vocabulary pass: KL(reference || lens) and ``-log
    q(target)``, where ``target_ids`` ``[tokens]`` may hold -1 (no next token: ``ce`` is NaN there)."""
    W_U, b_U, softcap = decoder.W_U, decoder.b_U, decoder.softcap
    _check(normed, W_U, vocab_chunk, token_chunk)
    with torch.no_grad():
        normed = normed.detach().float()
        kl, _, logz = _pass(normed, W_U.detach(), None if b_U is None else b_U.detach(), softcap, "kl", reference,
                            vocab_chunk, token_chunk, False, reference["matmul_dtype"])
        valid = target_ids >= 0
        z_t, _, _ = _column_logits(normed, W_U.detach(), b_U, softcap, target_ids.clamp(min=0))
        ce = torch.where(valid, logz - z_t, torch.full_like(logz, float("nan")))
    return kl, ce

__all__ = ["reference_summary", "kl_divergence", "cross_entropy", "kl_and_cross_entropy"]
