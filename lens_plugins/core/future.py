"""Future Lens arithmetic (Pal et al., CoNLL 2023): pair each hidden state at position ``t`` with the final
layer's hidden state at ``t + N - 1`` (which the model decodes into its prediction of token ``t + N``), and
the bigram baseline. The maps themselves are applied by ``core.lenses.apply_affine``, as every affine lens is.

Torch only, no decorators, everything as arguments (see ``lens_plugins.core``).
"""

import torch

from lens_plugins.core.errors import LensValueError


def future_pairs(stack, final, n_ahead):
    """``(sources [rows, batch * (seq - N + 1), d], targets [batch * (seq - N + 1), d])`` from a residual stack
    ``[rows, batch, seq, d]`` and the final residual ``[batch, seq, d]``: source position ``t`` is paired with
    the final residual at ``t + N - 1``, for every ``t`` that has one."""
    if n_ahead < 1:
        raise LensValueError(f"n_ahead must be at least 1 (1: the next token, as the logit lens), got {n_ahead}")
    rows, batch, seq, d = stack.shape
    if seq < n_ahead:
        raise LensValueError(f"a sequence of {seq} tokens has no position {n_ahead - 1} tokens ahead: use longer blocks")
    span = seq - n_ahead + 1
    sources = stack[:, :, :span].reshape(rows, batch * span, d)
    targets = final[:, n_ahead - 1:].reshape(batch * span, d)
    return sources, targets


def bigram_table(blocks, n_ahead, vocab):
    """``[vocab]`` long: for each token ``x``, the token seen most often ``N`` positions after ``x`` in ``blocks
    [n, seq]`` (ties: the smallest id); tokens never seen followed by anything get the most frequent token."""
    x = blocks[:, : blocks.shape[1] - n_ahead].reshape(-1).long()
    y = blocks[:, n_ahead:].reshape(-1).long()
    pairs, counts = torch.unique(x * vocab + y, return_counts=True)
    xs, ys = pairs // vocab, pairs % vocab
    key = counts * vocab + (vocab - 1 - ys)  # unique per (x, y): the count first, then the smaller id
    best = torch.full((vocab,), -1, dtype=torch.long).scatter_reduce(0, xs, key, "amax")
    chosen = key == best[xs]
    table = torch.full((vocab,), int(torch.bincount(y, minlength=vocab).argmax()), dtype=torch.long)
    table[xs[chosen]] = ys[chosen]
    return table

__all__ = ["future_pairs", "bigram_table"]
