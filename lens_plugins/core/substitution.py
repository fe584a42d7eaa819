"""Sublayer substitution in torch (Din et al., LREC-COLING 2024, "Jump to Conclusions", sub-modules): the
least-squares affine map from a sublayer's input residual to what the sublayer adds to the residual, fitted
from Gram matrices accumulated block by block, and the substitution itself.

A sublayer (the attention or the MLP of one block) reads the residual stream ``x`` (``resid_pre`` for the
attention, ``resid_mid`` for the MLP, ``resid_pre`` for both in a parallel block) and adds its contribution
``y`` (``attn_out`` / ``mlp_out``). The shortcut is ``y ~ x W^T + b``; substituting it replaces ``y`` in the
forward pass by ``x W^T + b`` computed from the running ``x``, so every later layer sees the shortcut's
contribution.

Torch only, no decorators, everything as arguments: ships by source.
"""

import torch

from lens_plugins.core.errors import LensValueError

SUBLAYERS = ("attn", "mlp")
"""The sublayers a block's contribution is split into, in forward order."""

WRITE_HOOKS = {"attn": "attn_out", "mlp": "mlp_out"}
"""The row site of each sublayer's contribution (``Row(l, "attn_out")``)."""

READ_SITES = {"attn": "pre", "mlp": "mid"}
"""The row site of each sublayer's input residual (a parallel block's MLP reads ``pre``)."""


def accumulate(gram, cross, x, y):
    """Add pairs ``x [n, d_in]`` -> ``y [n, d_out]`` to ``gram [d_in + 1, d_in + 1]`` and ``cross [d_in + 1,
    d_out]`` (float64, in place; a column of ones stands for the bias)."""
    xa = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], -1)
    gram += xa.T @ xa
    cross += xa.T @ y.double()


def solve(gram, cross, ridge=0.0):
    """``(weight [d_out, d_in], bias [d_out])`` float32 minimising ``|y - x W^T - b|^2 + ridge * mean(diag(x^T
    x)) * |W|^2`` from the accumulated ``gram`` and ``cross`` (the bias is not shrunk). ``ridge=0`` needs at
    least ``d_in + 1`` pairs."""
    if ridge < 0:
        raise LensValueError(f"ridge must be 0 or more, got {ridge}")
    d_in = gram.shape[0] - 1
    n = int(gram[d_in, d_in])
    if ridge == 0 and n < d_in + 1:
        raise LensValueError(f"{n} pairs do not determine an affine map of {d_in + 1} unknowns per output: give "
                             "more text, or pass ridge > 0")
    penalty = torch.eye(d_in + 1, dtype=gram.dtype, device=gram.device) * (ridge * gram.diagonal()[:d_in].mean())
    penalty[d_in, d_in] = 0.0
    solution, info = torch.linalg.solve_ex(gram + penalty, cross)
    if int(info) != 0 or not torch.isfinite(solution).all():
        raise LensValueError(f"the pairs do not determine an affine map of {d_in + 1} unknowns per output: "
                             "give more text, or pass ridge > 0")
    return solution[:d_in].T.float(), solution[d_in].float()


def r_squared(gram, cross, y_sq, y_sum, weight, bias):
    """The share of the targets' variance the map explains, ``1 - SSE / SST``, from the accumulated statistics
    alone (``y_sq``: sum of ``|y|^2``; ``y_sum [d_out]``: sum of ``y``), in float64."""
    solution = torch.cat([weight.double().T, bias.double()[None]], 0)  # [d_in + 1, d_out]
    n = gram[-1, -1]
    sse = y_sq - 2 * (solution * cross).sum() + (solution * (gram @ solution)).sum()
    sst = y_sq - y_sum.double().pow(2).sum() / n
    return float(1.0 - sse / sst)


def shortcut(x, weight, bias):
    """The shortcut's contribution ``x W^T + b``, computed in float32 and returned in ``x``'s dtype."""
    return (x.float() @ weight.to(x.device).float().T + bias.to(x.device).float()).to(x.dtype)


def final_top1_and_kl(logits, softcap=None):
    """From the final logits of ``[clean, substituted_1 .. substituted_m]`` copies ``[1 + m, seq, vocab]``:
    ``top1 [1 + m, seq]`` and ``KL(final clean || final substituted) [m, seq]`` (float32, soft-capped as the
    model's)."""
    logits = logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logprobs = logits.log_softmax(-1)
    clean = logprobs[:1]
    kl = (clean.exp() * (clean - logprobs[1:])).sum(-1)
    return logits.argmax(-1), kl

__all__ = ["SUBLAYERS", "WRITE_HOOKS", "READ_SITES", "accumulate", "solve", "r_squared", "shortcut",
           "final_top1_and_kl"]
