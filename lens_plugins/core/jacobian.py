"""The Jacobian lens's arithmetic in torch alone: the estimator's per-prompt rows and the edits its lens
vectors make (Gurnee et al. 2026, "Verbalizable Representations Form a Global Workspace").

For each source layer ``l`` the lens holds one ``[d, d]`` matrix

    J_l = mean over prompts of (1/|V|) sum_{t in V} sum_{t' in V, t' >= t} d h_final,t' / d h_l,t

with ``h_l`` block ``l``'s output, ``h_final`` the last block's output before the final norm and ``V`` the
positions after a leading skip, the last excluded. Row ``i`` of the per-prompt sum is one vector-Jacobian
product: the cotangent ``e_i`` planted at every position of ``V`` at once (causal attention keeps each
source's gradient to targets ``t' >= t``), read at the sources in ``V`` and averaged. ``prompt_jacobians``
takes ``chunk`` such cotangents per backward pass, batched with ``is_grads_batched`` (a vmap over the
backward), so the forward pass runs once, at batch 1, and its activations are kept once; the reference
implementation instead replicates the forward ``chunk`` times. The product is the same; only float32
rounding in the backward's sums differs.

The edits are what the lens's interventions do to a residual ``h [..., d]`` at a layer, written once for
both backends (a TransformerLens hook and an nnsight trace call the same functions; on an NDIF server too).
"""

import math

import torch

from lens_plugins.core.errors import LensFloatingPointError, LensValueError

# Tolerances of the sparse decomposition, as the reference implementation's: the NNLS solve and rank in
# float64 (sqrt(eps64)); an atom is selected only while materially positively correlated (sqrt(eps32) |x|).
NNLS_TOLERANCE = math.sqrt(torch.finfo(torch.float64).eps)
CORRELATION_TOLERANCE = math.sqrt(torch.finfo(torch.float32).eps)


def valid_positions(seq_len, skip_first):
    """The positions ``V`` a prompt of ``seq_len`` tokens contributes: after the first ``skip_first``, the last
    excluded (it has no next token in the prompt). Empty when the prompt is too short."""
    return list(range(skip_first, seq_len - 1))


def prompt_jacobians(target, sources, positions, chunk):
    """One prompt's ``[d, d]`` matrix per source: ``target [1, seq, d]`` (the last block's output) and
    ``sources`` (block outputs ``[1, seq, d]``, on the graph that made ``target``), read at ``positions``.

    ``chunk`` output dimensions per backward pass (memory: ``chunk`` copies of the backward's activations,
    never ``[d, tokens, d]`` unless ``chunk = d``). Returned in float32 on the CPU, whatever the model's dtype.
    """
    if chunk < 1:
        raise LensValueError(f"chunk must be at least 1, got {chunk}")
    if target.ndim != 3 or target.shape[0] != 1:
        raise LensValueError(f"the target must be one prompt's [1, seq, d_model], got {tuple(target.shape)}")
    d = target.shape[-1]
    device = target.device
    index = torch.as_tensor(positions, device=device)
    out = [torch.empty(d, d, dtype=torch.float32) for _ in sources]
    for start in range(0, d, chunk):
        n = min(chunk, d - start)
        lanes = torch.arange(n, device=device)
        cotangent = target.new_zeros((n,) + tuple(target.shape))
        cotangent[lanes[:, None], 0, index[None, :], start + lanes[:, None]] = 1.0
        grads = torch.autograd.grad(target, sources, cotangent, retain_graph=start + n < d, is_grads_batched=True)
        for matrix, grad in zip(out, grads):
            matrix[start:start + n] = grad[:, 0, index.to(grad.device), :].float().mean(dim=1).cpu()
        del grads
    return out


def unit_rows(vectors, layer):
    """``vectors [n, d]`` scaled to unit length (float32); a zero or non-finite direction is refused."""
    vectors = vectors.float()
    norms = vectors.norm(dim=-1, keepdim=True)
    if bool((~torch.isfinite(norms) | (norms <= torch.finfo(torch.float32).eps)).any()):
        raise LensValueError(f"a lens vector at layer {layer} is zero or not finite: it has no direction to "
                             "steer, ablate or swap along")
    return vectors / norms


def orthonormal_basis(units, layer):
    """``[d, k]``: an orthonormal basis of the span of ``units [n, d]`` (related tokens' lens vectors are far
    from orthogonal, so removing them one at a time would put back components along the earlier ones).
    Directions that add less than 1e-6 of the largest singular value are dropped."""
    u, s, _ = torch.linalg.svd(units.T.double(), full_matrices=False)
    keep = s > s[0] * 1e-6
    if not bool(keep.any()):
        raise LensValueError(f"the lens vectors at layer {layer} span nothing")
    return u[:, keep].float()


def steer(h, unit, alpha):
    """``h + alpha * median ||h|| * unit``: the norm-matched steering of the reference protocols (the median over
    the edited positions' norms, so an attention sink's huge norm does not set the scale)."""
    selected = h.float()
    scale = alpha * selected.norm(dim=-1).median()
    return selected + scale * unit.to(selected.device)


def ablate(h, basis):
    """``h - Q Q^T h``: ``h`` with no component left along the span of the ablated lens vectors."""
    selected = h.float()
    basis = basis.to(selected.device)
    return selected - (selected @ basis) @ basis.T


def swap(h, basis, pinv, alpha, clamped=None):
    """Exchange two concepts' lens coordinates: with ``V = [v_s, v_t]`` (``basis [d, 2]``) and ``c = V^+ h``,
    ``h + alpha * V (c_swapped - c)``, where ``c_swapped`` is ``c`` with its two entries exchanged, or the
    exchanged coordinates of a clean run (``clamped [..., 2]``) when given. What lies outside the span of the
    two vectors is untouched."""
    selected = h.float()
    basis, pinv = basis.to(selected.device), pinv.to(selected.device)
    coords = selected @ pinv.T
    target = coords[..., [1, 0]] if clamped is None else clamped.to(selected.device)
    return selected + alpha * ((target - coords) @ basis.T)


def edit(h, spec):
    """Apply one layer's edit ``spec`` (a plain dict: ``kind`` and its tensors, as ``lenses.jacobian`` builds
    it) to ``h [batch, pos, d]`` at ``spec["positions"]`` (negative ones count from the end of this forward's
    positions, as in a generation step; ``None``: every position), returning a new tensor in ``h``'s dtype."""
    positions = spec.get("positions")
    if positions is not None:
        n = h.shape[1]
        positions = [p + n if p < 0 else p for p in positions]
        if any(not 0 <= p < n for p in positions):
            raise LensValueError(f"edit positions {spec['positions']} are out of range for {n} positions")
    selected = h if positions is None else h[:, positions, :]
    kind = spec["kind"]
    if kind == "steer":
        changed = steer(selected, spec["unit"], spec["alpha"])
    elif kind == "ablate":
        changed = ablate(selected, spec["basis"])
    elif kind == "swap":
        changed = swap(selected, spec["basis"], spec["pinv"], spec["alpha"], spec.get("clamped"))
    else:
        raise LensValueError(f"unknown edit kind {kind!r}: steer, ablate or swap")
    changed = changed.to(h.dtype)
    if positions is None:
        return changed
    out = h.clone()
    out[:, positions, :] = changed
    return out

def nonnegative_least_squares(atoms, target):
    """``c >= 0`` minimising ``|atoms @ c - target|`` (``atoms [d, n]``), by Lawson and Hanson's active-set method
    in float64: an atom enters the free set when it is the most positively correlated with the residual, and
    leaves (by a step back to feasibility) when its free solution turns negative."""
    A, b = atoms.double(), target.double()
    n = A.shape[1]
    c = b.new_zeros(n)
    free = torch.zeros(n, dtype=torch.bool, device=A.device)
    scale = float(b.norm()) + 1e-300
    for _ in range(3 * n + 10):
        dual = A.T @ (b - A @ c)
        dual = dual.masked_fill(free, float("-inf"))
        tolerance = NNLS_TOLERANCE * A.norm(dim=0) * (scale + float((A.abs() @ c.abs()).norm()))
        if free.all() or bool((dual <= tolerance).all()):
            break
        free[int(dual.argmax())] = True
        for _ in range(3 * n + 10):
            columns = free.nonzero(as_tuple=True)[0]
            trial = b.new_zeros(n)
            trial[columns] = torch.linalg.pinv(A[:, columns], rtol=NNLS_TOLERANCE) @ b
            negative = free & (trial <= 0)
            if not bool(negative.any()):
                c = trial
                break
            ratio = torch.where(negative, c / (c - trial).clamp_min(1e-300), torch.full_like(c, float("inf")))
            c = c + float(ratio.min().clamp(0.0, 1.0)) * (trial - c)
            free = free & (c > NNLS_TOLERANCE * scale / A.norm(dim=0).clamp_min(1e-300))
            c = torch.where(free, c, torch.zeros_like(c))
    return c.clamp_min(0.0).to(target.dtype)


def decompose(x, J, W_U, k, vocab_chunk=8192):
    """A ``k``-sparse nonnegative combination of lens vectors (atoms ``v_t = J^T W_U[:, t]``) that explains
    ``x [d]``: nonnegative orthogonal matching pursuit, as the reference implementation's. Each step selects the
    unselected atom most correlated with the residual per unit norm (stopping once none is materially positively
    correlated), then re-solves every selected coefficient by nonnegative least squares. The dictionary
    ``[vocab, d]`` is never held whole: correlations are taken ``vocab_chunk`` tokens at a time.

    Returns a dict: ``support`` (token ids of the atoms with a material coefficient) and ``coordinates``,
    ``selected`` (every atom selected), ``reconstruction`` (the nonnegative combination), ``j_space`` (the
    projection of ``x`` on the span of the selected atoms) and ``non_j_space`` (``x`` minus it)."""
    target = x.float()
    J, W_U = J.float().to(target.device), W_U.to(target.device)
    if not bool(torch.isfinite(target).all()):
        raise LensFloatingPointError("the activation to decompose holds NaN or inf")
    vocab = W_U.shape[1]
    if not 1 <= k <= vocab:
        raise LensValueError(f"k={k}: give between 1 and {vocab} atoms")
    norms = torch.cat([(J.T @ W_U[:, i:i + vocab_chunk].float()).norm(dim=0) for i in range(0, vocab, vocab_chunk)])
    x_norm = float(target.norm())
    selected, coordinates, residual = [], target.new_zeros(0), target.clone()
    for _ in range(k):
        correlation = torch.cat([(J.T @ W_U[:, i:i + vocab_chunk].float()).T @ residual
                                 for i in range(0, vocab, vocab_chunk)]) / norms
        if selected:
            correlation[selected] = float("-inf")
        candidate = int(correlation.argmax())
        if float(correlation[candidate]) <= CORRELATION_TOLERANCE * x_norm:
            break
        selected.append(candidate)
        atoms = J.T @ W_U[:, selected].float()  # [d, selected]
        coordinates = nonnegative_least_squares(atoms, target)
        residual = target - atoms @ coordinates
    atoms = J.T @ W_U[:, selected].float() if selected else target.new_zeros(target.shape[0], 0)
    active = coordinates * atoms.norm(dim=0) > NNLS_TOLERANCE * x_norm
    if selected:
        unit = atoms.double() / atoms.double().norm(dim=0).clamp_min(1e-300)
        left, singular, _ = torch.linalg.svd(unit, full_matrices=False)
        basis = left[:, singular > NNLS_TOLERANCE * singular.max()]
        j_space = (basis @ (basis.T @ target.double())).float()
    else:
        j_space = torch.zeros_like(target)
    return {"support": torch.tensor(selected, dtype=torch.long)[active.cpu()], "coordinates": coordinates[active],
            "selected": torch.tensor(selected, dtype=torch.long), "reconstruction": atoms[:, active] @ coordinates[active],
            "j_space": j_space, "non_j_space": target - j_space}

__all__ = ["NNLS_TOLERANCE", "CORRELATION_TOLERANCE", "nonnegative_least_squares", "decompose", "valid_positions", "prompt_jacobians", "unit_rows", "orthonormal_basis", "steer", "ablate", "swap",
           "edit"]
