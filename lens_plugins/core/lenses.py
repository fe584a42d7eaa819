"""A lens's per-row map in torch alone, for the pipeline and for NDIF servers.

A lens (``lens_plugins.lenses``) transforms each row of the residual stack before the final norm. An affine
lens applied residually, ``h + h @ weight[r].T + bias[r]`` (the tuned-lens convention: zero weights are the
identity), is just tensors, so it ships to a remote trace and is applied here, by the same function on
every backend. Any other lens runs only where its own ``transform`` can run (a local trace or a cache).

A lens made for one model decodes another one's rows into numbers that look plausible and mean nothing (a
deeper tuned lens even maps the final row, so the last row no longer equals the model's output). A lens says
what it was made for with a ``made_for`` dict (``d_model``, ``n_layers``, ``model``, and, when it recorded
one, ``fingerprint(decoder)`` of that model); ``resolve`` compares it with the model that decodes the rows,
so that every entry point of both backends refuses a mismatch with the same message (``check_fits``).
"""

import torch

from lens_plugins.core.errors import LensFloatingPointError, LensTypeError, LensValueError
from lens_plugins.core.readout import all_finite

# The unembedding entries a fingerprint keeps: PROBE_ROWS rows of W_U (model dimensions) by PROBE_COLUMNS
# vocabulary columns, spread evenly. 512 numbers: cheap to gather on every call, small in a config.json.
PROBE_ROWS, PROBE_COLUMNS = 8, 64
# The mean |correlation| between a recorded and a present probe row above which the unembedding is the same:
# the same weights in another dtype give ~1, another model's weights |N(0, 1/64)| ~ 0.1.
PROBE_MATCH = 0.9


def probe(W_U):
    """``[PROBE_ROWS, PROBE_COLUMNS]`` float32 entries of ``W_U [d_model, vocab]`` at evenly spread indices."""
    rows = torch.linspace(0, W_U.shape[0] - 1, PROBE_ROWS).round().long().to(W_U.device)
    columns = torch.linspace(0, W_U.shape[1] - 1, PROBE_COLUMNS).round().long().to(W_U.device)
    return W_U.detach()[rows][:, columns].float().cpu()


def fingerprint(decoder):
    """What tells a model's unembedding apart from another of the same shape, for a lens to record when it
    is made: the vocabulary size and a ``probe`` of ``W_U``, as plain lists (JSON-ready)."""
    return {"d_vocab": int(decoder.d_vocab), "unembed_probe": probe(decoder.W_U).tolist()}


def same_unembedding(recorded, W_U):
    """Whether ``W_U`` is the unembedding a ``recorded`` probe came from: each probe row correlated with the
    present one (Pearson, absolute), averaged. Correlation ignores a per-row shift and scale, so the same
    model in another dtype, or with TransformerLens's ``center_unembed`` / ``fold_ln``, still matches."""
    old, new = torch.tensor(recorded, dtype=torch.float32), probe(W_U)
    old, new = old - old.mean(-1, keepdim=True), new - new.mean(-1, keepdim=True)
    cosine = (old * new).sum(-1) / (old.norm(dim=-1) * new.norm(dim=-1)).clamp(min=1e-12)
    return float(cosine.abs().mean()) >= PROBE_MATCH


def made_for(lens):
    """The ``made_for`` dict of a lens object or of its shipped tensors, or ``None`` if it records none."""
    found = lens.get("made_for") if isinstance(lens, dict) else getattr(lens, "made_for", None)
    return found or None


def check_fits(made, d_model, n_layers=None, decoder=None):
    """Refuse a lens made for another model: ``made`` (a lens's ``made_for``) against the model's width
    ``d_model``, its number of blocks ``n_layers`` and its ``decoder`` (vocabulary size and unembedding, when
    the lens recorded a ``fingerprint``); a key either side lacks is not compared (lenses saved before the
    fingerprint existed still load). The message names what differs on both sides, and the fix."""
    if not made:
        return
    ours = {"d_model": d_model, "n_layers": n_layers}
    recorded = made.get("fingerprint") or {}
    if decoder is not None:
        ours["d_vocab"] = decoder.d_vocab
    names = {"d_model": "d_model={}", "n_layers": "{} layers", "d_vocab": "a vocabulary of {} tokens"}
    theirs = {**{key: made.get(key) for key in ("d_model", "n_layers")}, "d_vocab": recorded.get("d_vocab")}
    differ = [key for key in names if None not in (theirs[key], ours.get(key)) and theirs[key] != ours[key]]
    lens_side = ", ".join(names[key].format(theirs[key]) for key in differ)
    model_side = ", ".join(names[key].format(ours[key]) for key in differ)
    if not differ and decoder is not None and recorded.get("unembed_probe") is not None \
            and not same_unembedding(recorded["unembed_probe"], decoder.W_U):
        lens_side, model_side = "its unembedding", "another unembedding (same shapes, other weights)"
    elif not differ:
        return
    raise LensValueError(
        f"lens= was made for another model ({made.get('model') or 'unnamed'}: {lens_side}), but this model has "
        f"{model_side}; decoding its rows through that lens would mean nothing (a deeper lens even remaps the "
        "final row). Load the lens trained for this model, or train one on it (lp.TunedLens.train(model, texts))"
    )


def apply_affine(resid, weight, bias):
    """``resid [rows, tokens, d] + resid @ weight[r].T + bias[r]`` per row, in float32; ``None`` parts are zero."""
    resid = resid.float()
    out = resid
    if weight is not None:
        out = out + torch.bmm(resid, weight.to(resid.device, torch.float32).transpose(1, 2))
    if bias is not None:
        out = out + bias.to(resid.device, torch.float32).unsqueeze(1)
    return out


def shipped(weight, bias, labels, made=None):
    """An affine lens as plain data for a trace body: its tensors for the rows ``labels`` names, and what it
    was made for (its ``made_for``), so that the server's ``resolve`` checks it against the model there."""
    return {"format": "lens_plugins.affine/1", "weight": weight, "bias": bias, "labels": list(labels),
            "made_for": made}


def resolve(lens, rows, decoder):
    """``(weight, bias, transform)`` of ``lens`` for ``rows`` (a row plan's selection: the last is the final
    row) decoded by ``decoder``: the affine tensors when the lens has them (or was shipped as them), else its
    ``transform``; all ``None`` for no lens or the identity. A lens made for another model is refused first
    (``check_fits``), here where every entry point of both backends resolves its lens."""
    if lens is None:
        return None, None, None
    d_model = decoder.d_model
    check_fits(made_for(lens), d_model, rows[-1].layer + 1, decoder)
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


def check_output(out, rows):
    """Refuse a lens's output ``[rows, tokens, d]`` holding NaN or inf, naming the first such row: its inputs
    were finite (``pipeline.check_finite``), so the lens's weights or its transform made them, and every
    statistic of that row would be NaN."""
    if all_finite(out):
        return
    bad = ~torch.isfinite(out).flatten(1).all(-1)
    if bad.any():
        row = int(bad.nonzero()[0])
        kind = "NaN" if torch.isnan(out[row]).any() else "inf"
        raise LensFloatingPointError(
            f"the lens (lens=) turned finite residuals into {kind} at row {rows[row].label!r} ({int(bad.sum())} of "
            f"{len(rows)} rows non-finite): its weights hold NaN/inf or its transform overflows. Check the lens "
            "(reload or retrain it)")


def apply(resid, rows, weight, bias, transform):
    """The lens's map on ``resid [rows, tokens, d]`` (what ``resolve`` returned), checked finite."""
    if transform is not None:
        out = transform(resid, rows)
        if tuple(out.shape) != tuple(resid.shape):
            raise LensValueError(f"the lens's transform returned shape {tuple(out.shape)} for a residual stack of "
                             f"shape {tuple(resid.shape)}: it must keep the shape")
    elif weight is None and bias is None:
        return resid
    else:
        out = apply_affine(resid, weight, bias)
    check_output(out, rows)
    return out

__all__ = ["PROBE_ROWS", "PROBE_COLUMNS", "PROBE_MATCH", "probe", "fingerprint", "same_unembedding", "made_for",
           "check_fits", "shipped", "resolve", "check_output", "apply_affine", "apply"]
