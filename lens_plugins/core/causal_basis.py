"""Causal checks of a lens in torch (Belrose et al. 2023, "Eliciting latent predictions ...", section on causal
basis extraction): the directions of the residual stream that most change a lens's prediction, and their
mean-ablation.

Mean-ablating an orthonormal basis ``V [k, d]`` replaces each state's component in ``span(V)`` with the mean
state's: ``h - ((h - mu) V^T) V``. The causal basis is found greedily: direction ``i`` maximises the mean
KL divergence ``KL(lens(h) || lens(ablate(h, v)))`` over unit ``v`` orthogonal to directions ``0 .. i-1``
(Adam on ``v``, projected onto the orthogonal complement and renormalised at every step), so the basis is
orthonormal by construction and ordered by the effect each direction has on the lens alone.

Torch only, no decorators, everything as arguments: ships by source.
"""

import torch

from lens_plugins.core.errors import LensValueError


def ablate(hidden, basis, mean):
    """Mean-ablate ``basis [k, d]`` (orthonormal rows) in ``hidden [..., d]``: its component along the basis
    becomes ``mean``'s ``[d]``. ``k = 0`` leaves ``hidden`` as it is."""
    hidden_f = hidden.float()
    basis = basis.to(hidden_f.device, torch.float32)
    coefficients = (hidden_f - mean.to(hidden_f.device, torch.float32)) @ basis.T
    return (hidden_f - coefficients @ basis).to(hidden.dtype)


def kl(logp, logq):
    """``KL(p || q)`` per leading index, from log-probabilities ``[..., vocab]`` (float32)."""
    logp, logq = logp.float(), logq.float()
    return (logp.exp() * (logp - logq)).sum(-1)


def random_basis(k, d, generator=None):
    """``k`` orthonormal directions in ``d`` dimensions, uniformly random (QR of a Gaussian matrix): the
    control a causal basis is compared with."""
    q, r = torch.linalg.qr(torch.randn(d, k, generator=generator))
    return (q * torch.sign(torch.diagonal(r))).T.contiguous()


def _orthogonal(v, basis):
    if basis.shape[0]:
        v = v - (v @ basis.T) @ basis
    return v / v.norm().clamp(min=1e-12)


def extract(hidden, logprobs, k, steps=30, lr=0.1, generator=None):
    """The causal basis ``(basis [k, d], gains [k])`` of a lens whose log-probabilities are
    ``logprobs(hidden [n, d]) -> [n, vocab]`` (differentiable), over the states ``hidden [n, d]``; ``gains[i]``
    is the mean KL of ablating direction ``i`` alone, once found. Greedy and orthonormal (see the module)."""
    d = hidden.shape[1]
    if not 1 <= k <= d:
        raise LensValueError(f"k must be between 1 and d_model ({d}), got {k}")
    if steps < 1:
        raise LensValueError(f"steps must be at least 1, got {steps}")
    hidden = hidden.detach().float()
    mean = hidden.mean(0)
    with torch.no_grad():
        clean = logprobs(hidden)
    basis = torch.zeros(0, d)
    gains = []
    for _ in range(k):
        start = _orthogonal(torch.randn(d, generator=generator), basis)
        v = start.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([v], lr=lr)
        for _ in range(steps):
            unit = _orthogonal(v, basis)
            loss = -kl(clean, logprobs(ablate(hidden, unit[None], mean))).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            unit = _orthogonal(v.detach(), basis)
            gains.append(float(kl(clean, logprobs(ablate(hidden, unit[None], mean))).mean()))
        basis = torch.cat([basis, unit[None]])
    return basis, torch.tensor(gains)

__all__ = ["ablate", "kl", "random_basis", "extract"]
