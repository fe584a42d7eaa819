"""Attention patterns inside an nnsight trace (locally or on an NDIF server): each chosen layer's softmaxed
weights, read as the forward pass reaches them and saved as plain tensors.

Only the ``"eager"`` implementation of transformers 5 forms the matrix (its explicit softmax); ``"sdpa"``, the
flash kernels and ``"flex_attention"`` return ``None``. A server loads its models with its own implementation
(the model key carries no ``attn_implementation``), so the trace switches the model's config to eager for
the forward it reads and puts the old value back when the last chosen layer has been read: transformers 5
reads ``config._attn_implementation`` at every call, both to build the mask and to pick the attention function,
so the switch made before the forward starts gives exactly the eager model's patterns. A switch made too late
(after the mask was built for another implementation) would give eager attention a mask of the wrong kind;
the patterns' causal structure is then checked, which catches it. Torch and core only, no decorators: ships
by source.
"""

import numbers

import torch

from lens_plugins.core import architectures
from lens_plugins.core import verification
from lens_plugins.core.errors import AttentionUnavailableError, LensIndexError, LensTypeError, LensValueError
from lens_plugins.core.trace.reader import inputs

FORMAT = "lens_plugins.attention/1"
_TOO_LATE = ("{what}: the forward pass began before the switch to eager attention, which must come before the "
             "mask is built. Call lp.nnsight.attention(model) first in the trace, before reading any module, or "
             "load the model with attn_implementation=\"eager\"")


def choose_layers(layers, n_layers):
    """``layers`` (default all) as non-negative indices of a model of ``n_layers``, in the order given,
    duplicates dropped; out of range refused."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise LensTypeError(f"layers must be a list of layer indices, e.g. layers=[0, {n_layers - 1}], got {layers!r}")
    layers = list(layers)
    if not layers:
        raise LensValueError("layers is empty: name at least one layer, or pass layers=None for all of them")
    chosen = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise LensTypeError(f"layers must hold integer layer indices, got {layer!r} in layers={layers!r}")
        layer = int(layer)
        if not -n_layers <= layer < n_layers:
            raise LensIndexError(f"layers: layer {layer} is out of range for a model of {n_layers} layers")
        chosen.append(layer % n_layers)
    return list(dict.fromkeys(chosen))


def attention(model, layers=None):
    """Inside ``with model.trace(prompt):``, save every chosen layer's attention probabilities.

    Call it before reading any other module in the trace: it switches the model to eager attention for this
    forward pass (see the module docstring). Returns a saved dict to pass to ``lp.nnsight.attention_result``
    after the trace. Reads the traced ``input_ids`` and ``attention_mask``, then each attention module's second
    output (``attn_weights``, ``[batch, head, query, key]``) in layer order, as the forward pass reaches them.
    """
    import nnsight
    from nnsight.intervention.interleaver import OutOfOrderError

    spec = verification.resolve(model)
    chosen = choose_layers(layers, len(architectures.get_path(model, spec["layers"])))
    config = model.config  # the real config object every attention module reads (on a server: the server's)
    previous = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "eager"
    try:
        try:
            args, kwargs = inputs(model)
        except OutOfOrderError as error:
            raise AttentionUnavailableError(_TOO_LATE.format(what="the model's inputs were already passed")) from error
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            raise LensValueError("attention views need input_ids to label their tokens: trace token ids or text, "
                                 "not inputs_embeds")
        mask = kwargs.get("attention_mask")
        patterns = {}
        for layer in sorted(chosen):  # the forward reaches them in layer order, whatever order was asked for
            weights = architectures.component(model, spec, "attn", layer).output[1]
            if weights is None:  # a module that skips the weights even when eager
                raise AttentionUnavailableError(f"layer {layer}'s attention returned no weights although the model "
                                                "was switched to attn_implementation=\"eager\"")
            weights = weights.detach().float()
            if previous != "eager":  # a model loaded eager may attend both ways (a prefix LM): nothing to check
                check_causal(weights, mask, layer)
            patterns[layer] = weights.cpu()
    finally:
        config._attn_implementation = previous
    return nnsight.save({
        "format": FORMAT, "layers": chosen, "patterns": torch.stack([patterns[layer] for layer in chosen]), "token_ids": tokens.cpu(),
        "attention_mask": torch.ones_like(tokens).cpu() if mask is None else mask.cpu(),
    })


def check_causal(weights, mask, layer):
    """Refuse patterns ``[batch, head, query, key]`` in which a real token's query puts weight on a later token:
    a causal LM's are exactly zero above the diagonal, unless eager attention ran with a mask built for another
    implementation (the switch came after the forward had built it). A padding query's row is whatever the
    implementation makes of a fully masked row, so it is not checked."""
    later = weights.triu(1).ne(0).any(1).any(-1)  # [batch, query]
    if mask is not None:
        later = later & mask.to(later.device).bool()
    if bool(later.any()):
        raise AttentionUnavailableError(_TOO_LATE.format(what=f"layer {layer}'s attention puts weight on later "
                                                              "tokens"))


__all__ = ["FORMAT", "choose_layers", "attention", "check_causal"]
