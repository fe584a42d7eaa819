"""Attention patterns inside an nnsight trace (locally or on an NDIF server): each chosen layer's softmaxed
weights, read as the forward pass reaches them and saved as plain tensors.

Only the ``"eager"`` implementation of transformers 5 forms the matrix (its explicit softmax); ``"sdpa"``, the
flash kernels and ``"flex_attention"`` return ``None``, so the implementation is checked first and
``AttentionUnavailableError`` names the fix. Torch and core only, no decorators: ships by source.
"""

import torch

from lens_plugins.core import architectures
from lens_plugins.core.errors import AttentionUnavailableError, LensIndexError, LensValueError

FORMAT = "lens_plugins.attention/1"
# The attention implementations of transformers 5 whose modules return the softmaxed weights.
RETURNS_WEIGHTS = ("eager", "paged|eager")


def choose_layers(layers, n_layers):
    """``layers`` (default all) as non-negative indices of a model of ``n_layers``, in the order given,
    duplicates dropped; out of range refused."""
    if layers is None:
        return list(range(n_layers))
    chosen = []
    for layer in layers:
        if not -n_layers <= layer < n_layers:
            raise LensIndexError(f"layer {layer} is out of range for a model of {n_layers} layers")
        chosen.append(layer % n_layers)
    return list(dict.fromkeys(chosen))


def check_implementation(config):
    """Refuse, before a forward pass, an attention implementation that returns no weights."""
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in RETURNS_WEIGHTS:
        raise AttentionUnavailableError(
            f"the model runs attention with attn_implementation={implementation!r}, which never forms the "
            "attention probabilities (sdpa, flash and flex attention return no weights): load it with "
            "AutoModelForCausalLM.from_pretrained(path, attn_implementation=\"eager\") or set "
            "model.config._attn_implementation = \"eager\" (lens_plugins.load_hf_model loads eager)"
        )


def attention(model, layers=None):
    """Inside ``with model.trace(prompt):``, save every chosen layer's attention probabilities.

    Returns a saved dict to pass to ``lp.nnsight.attention_result`` after the trace. Reads the traced ``input_ids`` and
    ``attention_mask``, then each attention module's second output (``attn_weights``,
    ``[batch, head, query, key]``) in layer order, as the forward pass reaches them.
    """
    import nnsight

    hf = getattr(model, "_model", model)
    check_implementation(hf.config)
    spec = architectures.resolve(model)
    chosen = choose_layers(layers, len(architectures.get_path(hf, spec["layers"])))
    args, kwargs = model.inputs
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        raise LensValueError("attention views need input_ids to label their tokens: trace token ids or text, not inputs_embeds")
    mask = kwargs.get("attention_mask")
    patterns = []
    for layer in chosen:
        weights = architectures.component(model, spec, "attn", layer).output[1]
        if weights is None:  # a config that says eager but a module that skipped the weights
            raise AttentionUnavailableError(f"layer {layer}'s attention returned no weights; load the model "
                                            "with attn_implementation=\"eager\"")
        patterns.append(weights.detach().float().cpu())
    return nnsight.save({
        "format": FORMAT, "layers": chosen, "patterns": torch.stack(patterns), "token_ids": tokens.cpu(),
        "attention_mask": torch.ones_like(tokens).cpu() if mask is None else mask.cpu(),
    })

__all__ = ["FORMAT", "RETURNS_WEIGHTS", "choose_layers", "check_implementation", "attention"]
