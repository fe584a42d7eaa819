"""Attention patterns from TransformerLens caches: ``attention(cache, tokens)`` reads each layer's
``blocks.{L}.attn.hook_pattern`` (cache with ``names_filter=attention_hook_filter(model)``), and the one-call
``run_attention(model, prompt)`` caches only those."""

from typing import Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor

from lens_plugins.backends._common import Prompt, one_at_a_time
from lens_plugins.backends.transformer_lens.reader import prompt_inputs
from lens_plugins.core.errors import LensKeyError, LensValueError
from lens_plugins.core.trace.attention import choose_layers
from lens_plugins.methods.attention import AttentionResult, attention_result
from lens_plugins.typecheck import typechecked


def pattern_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def attention_hook_filter(model, layers: Optional[list[int]] = None) -> list[str]:
    """The ``run_with_cache(names_filter=...)`` that keeps the patterns of ``layers`` (default all)."""
    return [pattern_hook(layer) for layer in choose_layers(layers, model.cfg.n_layers)]


@typechecked
def attention(
    cache,
    tokens: Int[Tensor, "batch seq"],
    *,
    layers: Optional[list[int]] = None,
    attention_mask: Optional[Tensor] = None,
    tokenizer=None,
) -> AttentionResult:
    """The patterns of a TransformerLens cache (``hook_pattern`` of each layer) for the prompt ``tokens``."""
    model = getattr(cache, "model", None)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise LensValueError("no tokenizer to show the tokens with: pass tokenizer=, or use a cache built by model.run_with_cache")
    if model is not None:
        n_layers = model.cfg.n_layers
    else:
        n_layers = sum(1 for name in cache.keys() if name.endswith("attn.hook_pattern"))
    chosen = choose_layers(layers, n_layers)
    missing = [pattern_hook(layer) for layer in chosen if pattern_hook(layer) not in cache.cache_dict]
    if missing:
        raise LensKeyError(f"the cache has no {missing[0]!r}; run model.run_with_cache(prompt, "
                       "names_filter=lp.transformer_lens.attention_hook_filter(model))")
    patterns = torch.stack([cache[pattern_hook(layer)].detach() for layer in chosen])
    if patterns.dim() == 4:  # a cache of a single prompt without its batch axis
        patterns = patterns.unsqueeze(1)
    return attention_result(chosen, patterns, tokens, attention_mask, tokenizer)


@one_at_a_time
@typechecked
def run_attention(model, prompt: Prompt, layers: Optional[list[int]] = None, *,
                  padding_side: Optional[str] = None, prepend_bos: Optional[bool] = None) -> AttentionResult:
    """Run a TransformerLens model on ``prompt`` caching only the patterns: the one-call form, tokenized and
    padded as ``run_logit_lens`` does (``padding_side``, ``prepend_bos``), so that it shows the attention of
    the tokens the lens ran.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer``.
        prompt: a text or a list of texts, or model inputs (a processor's output: ``input_ids``, ``pixel_values`` ...).
        layers: the layers to read; default all.
        padding_side: ``"left"`` or ``"right"`` for a batch.
        prepend_bos: as ``run_logit_lens``.

    Returns:
        An ``AttentionResult``: ``patterns [layer, batch, head, query, key]`` in float32.

    Raises:
        AttentionUnavailableError: the model does not form attention weights (not eager attention).
    """
    tokens, mask, extra = prompt_inputs(model, prompt, padding_side, prepend_bos)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, **extra, names_filter=attention_hook_filter(model, layers))
    return attention(cache, tokens, layers=layers, attention_mask=mask)

__all__ = ["pattern_hook", "attention_hook_filter", "attention", "run_attention"]
