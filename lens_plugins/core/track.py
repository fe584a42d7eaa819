"""Tokens worth tracking, found automatically: tokens that surface at an intermediate row and fade.

A lens's usual trajectories follow the user's targets or the final top-1, so a token the model considered at
row 12 and dropped by the last row is invisible unless the user already knew to name it. ``auto_tokens`` finds
such tokens from what the streamed readout has already computed, without a further vocabulary pass:

1. Candidates: per position, the union of every row's top-k ids (the readout's ``top_ids``; a token never in
   any row's top-k cannot have peaked anywhere worth showing).
2. Trajectories: each candidate's log-probability at every row, ``logit - log_partition``, its logit being
   ``d_model`` dot products with its unembedding column (as ``targets=`` scores a token), the log-partition the
   readout's. So the vocabulary is read once, by the readout; this adds ``rows x candidates`` dot products per
   position, computed in blocks of positions to bound memory.
3. Choice: the final row's top-1 first (the reference trajectory); then tokens that were top-1 at an
   intermediate row but are not at the final row; then the rest; within each tier by the *fade score*
   ``max over intermediate rows of p_row(t) - p_final(t)``. Intermediate rows are those strictly between the
   first (the input row) and the last: the input row of a model with tied embeddings decodes to the input token
   itself, which would otherwise win at every position.

Torch only, plain arguments, plain dict out: it runs where the readout runs (on the NDIF server for a remote
trace), so only the chosen tokens' trajectories travel.
"""

import torch

from lens_plugins.core.errors import LensValueError

NO_TOKEN = -1  # an unused slot: fewer distinct candidates than tokens asked for
# Why a token was chosen (``auto_reasons``), best tier first.
REASONS = (
    "final top-1",
    "top-1 at an intermediate row, not at the final row",
    "more likely at an intermediate row than at the final row",
    "in some row's top-k, no more likely anywhere than at the final row",
)
FINAL_TOP1, PEAKED, FADED, OTHER = range(len(REASONS))
BLOCK_ELEMENTS = 2**22  # floats of unembedding columns gathered at once (positions x candidates x d_model)


def check_auto_tokens(n):
    """``n`` as the number of tokens to track per position (0: off), or refused."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise LensValueError(f"auto_tokens must be a non-negative integer (tokens tracked per position, 0 for none), "
                             f"got {n!r}")
    return n


def candidates(top_ids):
    """``[tokens, rows * k]``: per position, the distinct ids of every row's top-k (``top_ids [rows, tokens,
    k]``), each once, the duplicates replaced by ``NO_TOKEN``."""
    rows, tokens, k = top_ids.shape
    ids = top_ids.permute(1, 0, 2).reshape(tokens, rows * k)
    ordered, _ = ids.sort(-1)
    repeated = torch.zeros_like(ordered, dtype=torch.bool)
    repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return torch.where(repeated, torch.full_like(ordered, NO_TOKEN), ordered)


def logprobs(normed, decoder, log_partition, ids):
    """``[rows, tokens, C]`` log-probabilities of ``ids [tokens, C]`` at every row of ``normed [rows, tokens,
    d_model]`` (already through the final norm): logits by dot products, minus the readout's ``log_partition
    [rows, tokens]``; NaN where the id is ``NO_TOKEN``. Blocks of positions keep the gathered columns under
    ``BLOCK_ELEMENTS`` floats."""
    rows, tokens, d = normed.shape
    n_ids = max(ids.shape[1], 1)
    block = max(1, BLOCK_ELEMENTS // (n_ids * d))
    out = []
    for n0 in range(0, tokens, block):
        chunk = ids[n0:n0 + block]
        safe = chunk.clamp(min=0)
        logits = torch.einsum("rnd,ncd->rnc", normed[:, n0:n0 + block].float(), decoder.W_U.T[safe].float())
        if decoder.b_U is not None:
            logits = logits + decoder.b_U.float()[safe]
        if decoder.softcap is not None:
            logits = decoder.softcap * torch.tanh(logits / decoder.softcap)
        values = logits - log_partition[:, n0:n0 + block].unsqueeze(-1)
        out.append(torch.where(chunk >= 0, values, torch.full_like(values, float("nan"))))
    return torch.cat(out, dim=1)


def choose(top_ids, trajectories, ids, n):
    """The ``n`` best of the candidates ``ids [tokens, C]`` with log-prob ``trajectories [rows, tokens, C]``
    (module docstring): ``auto_ids [tokens, n]``, their ``auto_logprobs [rows, tokens, n]``, ``auto_reasons``
    (an index into ``REASONS``), ``auto_peak_rows`` (the intermediate row where each is most likely; -1 when
    there is none), ``auto_scores`` (the fade score). Unused slots hold ``NO_TOKEN``, -1, NaN."""
    rows = trajectories.shape[0]
    if ids.shape[1] < n:  # fewer candidates than asked for: every result keeps n slots
        missing = n - ids.shape[1]
        ids = torch.cat([ids, torch.full_like(ids[:, :1], NO_TOKEN).expand(-1, missing)], dim=-1)
        trajectories = torch.cat([trajectories, trajectories[..., :1].expand(-1, -1, missing)], dim=-1)
    probs = trajectories.exp().nan_to_num(nan=0.0)
    final = probs[-1]
    middle = slice(1, -1) if rows > 2 else slice(0, rows - 1)
    if rows > 1:
        peak, peak_row = probs[middle].max(0)
        peak_row = peak_row + (middle.start or 0)
        top1 = top_ids[middle, :, 0]  # [middle rows, tokens]
        peaked = (ids.unsqueeze(0) == top1.unsqueeze(-1)).any(0)
    else:
        peak, peak_row = final, torch.full_like(ids, -1)
        peaked = torch.zeros_like(ids, dtype=torch.bool)
    score = peak - final
    is_final = ids == top_ids[-1, :, :1]
    peaked = peaked & ~is_final
    reasons = torch.full_like(ids, OTHER)
    reasons = torch.where(score > 0, torch.full_like(ids, FADED), reasons)
    reasons = torch.where(peaked, torch.full_like(ids, PEAKED), reasons)
    reasons = torch.where(is_final, torch.full_like(ids, FINAL_TOP1), reasons)
    key = score + 3.0 * peaked + 6.0 * is_final  # the score lies in [-1, 1]: tiers never overlap
    key = torch.where(ids >= 0, key, torch.full_like(key, float("-inf")))
    best, order = key.topk(n, dim=-1)
    used = best > float("-inf")

    def pick(values, fill):
        picked = values.gather(-1, order)
        return torch.where(used, picked, torch.full_like(picked, fill))

    chosen_logprobs = trajectories.gather(-1, order.unsqueeze(0).expand(rows, -1, -1))
    return {
        "auto_ids": pick(ids, NO_TOKEN),
        "auto_logprobs": torch.where(used.unsqueeze(0), chosen_logprobs, torch.full_like(chosen_logprobs, float("nan"))),
        "auto_reasons": pick(reasons, -1),
        "auto_peak_rows": pick(peak_row if rows > 1 else torch.full_like(ids, -1), -1),
        "auto_scores": pick(score, float("nan")),
    }


def auto_tokens(normed, decoder, log_partition, top_ids, n):
    """The tracked tokens of one lens (module docstring): ``normed [rows, tokens, d_model]`` through the final
    norm, the readout's ``log_partition [rows, tokens]`` and ``top_ids [rows, tokens, k]``, ``n`` per
    position. A plain dict of tensors (``choose``)."""
    ids = candidates(top_ids.to(normed.device))
    trajectories = logprobs(normed, decoder, log_partition.to(normed.device), ids)
    return choose(top_ids.to(normed.device), trajectories, ids, n)

__all__ = ["NO_TOKEN", "REASONS", "FINAL_TOP1", "PEAKED", "FADED", "OTHER", "BLOCK_ELEMENTS", "check_auto_tokens",
           "candidates", "logprobs", "choose", "auto_tokens"]
