"""Cross-model Patchscopes in torch: pairing two tokenizations of one text, and the least-squares affine map
between two models' hidden states (Ghandeharioun et al., ICML 2024, section 5).

A hidden state at a token summarises the text up to that token's end. Two models whose tokenizers cut the
same text differently therefore have comparable states only where both tokenizations end a token at the same
character offset: ``aligned_pairs`` keeps exactly those positions. The map ``y ~ W x + b`` from a source row
to a target row is solved in closed form from Gram matrices in float64 (``affine_solve``; a ridge relative to
the mean input energy, the bias unpenalised), and judged by ``r_squared`` on held-out pairs.

Torch only, no decorators, everything as arguments: ships by source.
"""

import torch

from lens_plugins.core.errors import LensValueError


def aligned_pairs(source_ends, target_ends):
    """``(source_index [n], target_index [n])``: the positions where both tokenizations end a token at the
    same character offset. ``*_ends`` hold each token's end offset in the text, ``-1`` for a token that
    spells no text (a BOS the tokenizer added). Where several tokens end at one offset (a character split
    over byte tokens), the last of them is the one that has read the whole character, so it is kept."""
    source_last = {int(end): i for i, end in enumerate(source_ends) if int(end) >= 0}
    target_last = {int(end): j for j, end in enumerate(target_ends) if int(end) >= 0}
    common = sorted(set(source_last) & set(target_last))
    return (torch.tensor([source_last[end] for end in common], dtype=torch.long),
            torch.tensor([target_last[end] for end in common], dtype=torch.long))


def with_ones(x):
    """``[n, d] -> [n, d + 1]`` float64, a column of ones appended (the bias's input)."""
    x = x.double()
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=-1)


def affine_solve(x, y, ridge=0.0):
    """The least-squares affine map from ``x [n, d_in]`` to ``y [n, ..., d_out]`` (any number of targets in
    the middle, solved at once): ``(weight [..., d_out, d_in], bias [..., d_out])`` float32, minimising
    ``|y - x W^T - b|^2 + ridge * mean(diag(x^T x)) * |W|^2``. With ``ridge=0`` the system must be
    determined: at least ``d_in + 1`` pairs."""
    n, d_in = x.shape
    if ridge < 0:
        raise LensValueError(f"ridge must be 0 or more, got {ridge}")
    if ridge == 0 and n < d_in + 1:
        raise LensValueError(f"{n} paired hidden states cannot determine an affine map of {d_in + 1} unknowns per "
                             f"output: give more text, or pass ridge > 0")
    xa = with_ones(x)
    targets = y.double().reshape(n, -1)
    if ridge == 0:  # on the pairs themselves, not their Gram matrix: half the condition number's exponent
        solution = torch.linalg.lstsq(xa, targets, driver="gelsd" if xa.device.type == "cpu" else None).solution
    else:
        gram = xa.T @ xa
        penalty = torch.eye(d_in + 1, dtype=gram.dtype, device=gram.device) * (ridge * gram.diagonal()[:d_in].mean())
        penalty[d_in, d_in] = 0.0  # the bias is not shrunk
        solution = torch.linalg.solve(gram + penalty, xa.T @ targets)
    d_out = y.shape[-1]
    middle = tuple(y.shape[1:-1])
    weight = solution[:d_in].T.reshape(middle + (d_out, d_in))
    bias = solution[d_in].reshape(middle + (d_out,))
    return weight.float(), bias.float()


def r_squared(x, y, weight, bias):
    """The share of ``y``'s variance ``[n, d_out]`` (summed over dimensions, about its own mean) that the map
    ``x @ weight.T + bias`` explains: ``1 - SSE / SST``, in float64. Negative when the map is worse than
    predicting the mean."""
    y = y.double()
    predicted = x.double() @ weight.double().T + bias.double()
    sse = (y - predicted).pow(2).sum()
    sst = (y - y.mean(0, keepdim=True)).pow(2).sum()
    return float(1.0 - sse / sst)

__all__ = ["aligned_pairs", "with_ones", "affine_solve", "r_squared"]
