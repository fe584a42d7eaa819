"""A lens's per-row map in torch alone, for the pipeline and for NDIF servers.

A lens (``lens_plugins.lenses``) transforms each row of the residual stack before the final norm. An affine
lens applied residually, ``h + h @ weight[r].T + bias[r]`` (the tuned-lens convention: zero weights are the
identity), is just tensors, so it ships to a remote trace and is applied here, by the same function on
every backend. Any other lens runs only where its own ``transform`` can run (a local trace or a cache).
"""

import torch

from lens_plugins.core.errors import LensTypeError, LensValueError


def apply_affine(resid, weight, bias):
    """``resid [rows, tokens, d] + resid @ weight[r].T + bias[r]`` per row, in float32; ``None`` parts are zero."""
    resid = resid.float()
    out = resid
    if weight is not None:
        out = out + torch.bmm(resid, weight.to(resid.device, torch.float32).transpose(1, 2))
    if bias is not None:
        out = out + bias.to(resid.device, torch.float32).unsqueeze(1)
    return out


def shipped(weight, bias, labels):
    """An affine lens as plain data for a trace body: its tensors for the rows ``labels`` names."""
    return {"format": "lens_plugins.affine/1", "weight": weight, "bias": bias, "labels": list(labels)}


def resolve(lens, rows, d_model):
    """``(weight, bias, transform)`` of ``lens`` for ``rows``: the affine tensors when the lens has them
    (or was shipped as them), else its ``transform``; all ``None`` for no lens or the identity."""
    if lens is None:
        return None, None, None
    labels = [row.label for row in rows]
    if isinstance(lens, dict):
        if lens.get("format") != "lens_plugins.affine/1":
            raise LensTypeError("lens= takes a lens object (lens_plugins.lenses) or the tensors "
                            "lp.nnsight.lens_tensors(model, lens, ...) made of one; got another dict")
        if lens["labels"] != labels:
            raise LensValueError(f"the shipped lens was made for rows {lens['labels']}, but this lens reads rows "
                             f"{labels}: make it with the same layers= / resid_mid= / sublayers=")
        return lens["weight"], lens["bias"], None
    affine = getattr(lens, "affine", None)
    if affine is not None:
        weight, bias = affine(rows, d_model)
        return weight, bias, None
    if not callable(getattr(lens, "transform", None)):
        raise LensTypeError(f"lens={type(lens).__name__} has neither transform(resid, rows) nor affine(rows, d_model)")
    return None, None, lens.transform


def apply(resid, rows, weight, bias, transform):
    """The lens's map on ``resid [rows, tokens, d]`` (what ``resolve`` returned)."""
    if transform is not None:
        out = transform(resid, rows)
        if tuple(out.shape) != tuple(resid.shape):
            raise LensValueError(f"the lens's transform returned shape {tuple(out.shape)} for a residual stack of "
                             f"shape {tuple(resid.shape)}: it must keep the shape")
        return out
    if weight is None and bias is None:
        return resid
    return apply_affine(resid, weight, bias)

__all__ = ["apply_affine", "shipped", "resolve", "apply"]
