"""Attention patterns: where each head looks, read from a TransformerLens cache or an nnsight trace.

The logit lens says what the model thinks at each layer; the attention pattern says where it looks. An
``AttentionResult`` holds the softmaxed patterns ``[layer, batch, head, query, key]`` with the prompt's tokens,
so its figures (``head_view``, ``model_view``, ``sink_figure`` in ``lens_plugins.plot_attention``) need no model.

Where the patterns come from:

- TransformerLens (a ``TransformerBridge`` or a 3.9 ``HookedTransformer``): ``blocks.{L}.attn.hook_pattern``,
  cached with ``names_filter=attention.hook_filter(model)``.
- nnsight on Hugging Face transformers 5: each attention module returns ``(attn_output, attn_weights)``, and
  only the ``"eager"`` implementation fills ``attn_weights`` (its explicit softmax). ``"sdpa"``, the
  flash-attention kernels and ``"flex_attention"`` never form the matrix and return ``None``, so reading
  them raises ``AttentionUnavailableError`` naming the fix: load with ``attn_implementation="eager"``
  (``lens_plugins.load_hf_model`` and ``load_default_model`` already do).
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins.core import architectures
from lens_plugins.tokens import token_strings
from lens_plugins.typecheck import typechecked

# The attention implementations of transformers 5 whose modules return the softmaxed weights.
RETURNS_WEIGHTS = ("eager", "paged|eager")


class AttentionUnavailableError(RuntimeError):
    """The model's attention implementation does not materialise the attention probabilities."""


@typechecked
@dataclass
class AttentionResult:
    """Attention probabilities of every (chosen) layer and head for a batch of prompts.

    ``patterns[l, b, h, q, k]`` is how much query position ``q`` of prompt ``b`` attends to key position
    ``k`` in head ``h`` of layer ``layers[l]``; each row over ``k`` sums to 1 (causal: zero above the
    diagonal, and zero on padding keys). Stored in float32 whatever the model's dtype.
    """

    layers: list[int]
    patterns: Float[Tensor, "layer batch head query key"]
    token_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    vocab_strings: dict[int, str]

    def __post_init__(self) -> None:
        if len(self.layers) != self.patterns.shape[0]:
            raise ValueError(f"{len(self.layers)} layer indices for {self.patterns.shape[0]} layers of patterns")
        if self.patterns.shape[-1] != self.token_ids.shape[1] or self.patterns.shape[-2] != self.token_ids.shape[1]:
            raise ValueError(f"patterns are {tuple(self.patterns.shape[-2:])} query x key positions for a "
                             f"prompt of {self.token_ids.shape[1]} tokens")

    @property
    def n_heads(self) -> int:
        return self.patterns.shape[2]

    def token(self, token_id: int) -> str:
        return self.vocab_strings.get(int(token_id), f"<{int(token_id)}>")

    def str_tokens(self, batch: int = 0) -> list[str]:
        return [self.token(i) for i in self.token_ids[batch].tolist()]

    def layer_index(self, layer: int) -> int:
        """Index along the ``layer`` axis of model layer ``layer`` (negative counts from the last stored)."""
        if -len(self.layers) <= layer < 0:
            return len(self.layers) + layer
        if layer not in self.layers:
            raise IndexError(f"layer {layer} was not read; this result holds layers {self.layers}")
        return self.layers.index(layer)

    def head(self, layer: int, head: int, batch: int = 0) -> Float[Tensor, "query key"]:
        if not -self.n_heads <= head < self.n_heads:
            raise IndexError(f"head {head} is out of range: layers here have {self.n_heads} heads, 0..{self.n_heads - 1}")
        if not 0 <= batch < self.token_ids.shape[0]:
            raise IndexError(f"batch {batch} is out of range: this result holds {self.token_ids.shape[0]} prompt(s)")
        return self.patterns[self.layer_index(layer), batch, head]

    def first_positions(self) -> Int[Tensor, "batch"]:
        """Each prompt's first real (unpadded) position: the sink candidate, usually the BOS token."""
        return self.attention_mask.to(torch.long).argmax(dim=1)

    def sink_score(self) -> Float[Tensor, "layer batch head"]:
        """Share of attention on each prompt's first token, averaged over the queries after it.

        The first query is left out: causally it can attend only to itself, so it would add a 1 to every
        head. A head scoring near 1 is an attention sink (Xiao et al. 2023): it parks its attention on the
        first token when it has nothing to do. NaN for a prompt of one real token.
        """
        first = self.first_positions()
        seq = self.token_ids.shape[1]
        positions = torch.arange(seq)
        scores = []
        for b in range(self.token_ids.shape[0]):
            queries = (positions > first[b]) & (self.attention_mask[b] > 0)
            on_first = self.patterns[:, b, :, :, first[b]]  # [layer, head, query]
            n = queries.sum()
            scores.append((on_first * queries).sum(-1) / n if n > 0 else torch.full(on_first.shape[:2], float("nan")))
        return torch.stack(scores, dim=1)

    def to_dataframe(self):
        """One row per (layer, batch, head): the sink score."""
        import pandas as pd

        sink = self.sink_score()
        return pd.DataFrame.from_records([
            {"layer": layer, "batch": b, "head": h, "sink_score": float(sink[i, b, h])}
            for i, layer in enumerate(self.layers) for b in range(sink.shape[1]) for h in range(sink.shape[2])
        ])

    def plot(self, layer: int = 0, head: int = 0, batch: int = 0):
        """The head view of one head (``model_view()`` for every head at once)."""
        from lens_plugins.plot_attention import head_view

        return head_view(self, layer, head, batch)

    def model_view(self, batch: int = 0):
        from lens_plugins.plot_attention import model_view

        return model_view(self, batch)


def _choose_layers(layers: Optional[list[int]], n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    chosen = []
    for layer in layers:
        if not -n_layers <= layer < n_layers:
            raise IndexError(f"layer {layer} is out of range for a model of {n_layers} layers")
        chosen.append(layer % n_layers)
    return list(dict.fromkeys(chosen))


def _mask(tokens: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    if attention_mask is None:
        return torch.ones_like(tokens, dtype=torch.long)
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(tokens.shape)}")
    return attention_mask.to(torch.long).cpu()


def _result(layers, patterns, tokens, attention_mask, tokenizer) -> AttentionResult:
    tokens = tokens.cpu().to(torch.long)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    return AttentionResult(
        layers=layers, patterns=patterns.detach().float().cpu(), token_ids=tokens,
        attention_mask=_mask(tokens, attention_mask), vocab_strings=token_strings(tokenizer, tokens),
    )


# --- TransformerLens ---------------------------------------------------------------------------------


def pattern_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def hook_filter(model, layers: Optional[list[int]] = None) -> list[str]:
    """The ``run_with_cache(names_filter=...)`` that keeps the patterns of ``layers`` (default all)."""
    return [pattern_hook(layer) for layer in _choose_layers(layers, model.cfg.n_layers)]


@typechecked
def from_cache(
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
        raise ValueError("no tokenizer to show the tokens with: pass tokenizer=, or use a cache built by model.run_with_cache")
    if model is not None:
        n_layers = model.cfg.n_layers
    else:
        n_layers = sum(1 for name in cache.keys() if name.endswith("attn.hook_pattern"))
    chosen = _choose_layers(layers, n_layers)
    missing = [pattern_hook(layer) for layer in chosen if pattern_hook(layer) not in cache.cache_dict]
    if missing:
        raise KeyError(f"the cache has no {missing[0]!r}; run model.run_with_cache(prompt, "
                       "names_filter=lens_plugins.attention.hook_filter(model))")
    patterns = torch.stack([cache[pattern_hook(layer)].detach() for layer in chosen])
    if patterns.dim() == 4:  # a cache of a single prompt without its batch axis
        patterns = patterns.unsqueeze(1)
    return _result(chosen, patterns, tokens, attention_mask, tokenizer)


def run_transformer_lens(model, prompt: Union[str, list[str]], layers: Optional[list[int]] = None) -> AttentionResult:
    """Run a TransformerLens model on ``prompt`` caching only the patterns: the one-call form."""
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook_filter(model, layers))
    return from_cache(cache, tokens, layers=layers)


# --- nnsight -----------------------------------------------------------------------------------------


def check_implementation(config) -> None:
    """Refuse, before a forward pass, an attention implementation that returns no weights."""
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in RETURNS_WEIGHTS:
        raise AttentionUnavailableError(
            f"the model runs attention with attn_implementation={implementation!r}, which never forms the "
            "attention probabilities (sdpa, flash and flex attention return no weights): load it with "
            "AutoModelForCausalLM.from_pretrained(path, attn_implementation=\"eager\") or set "
            "model.config._attn_implementation = \"eager\" (lens_plugins.load_hf_model loads eager)"
        )


def trace_patterns(model, layers: Optional[list[int]] = None) -> dict:
    """Inside ``with model.trace(prompt):``, save every chosen layer's attention probabilities.

    Returns a saved dict to pass to ``nnsight_result`` after the trace. Reads the traced ``input_ids`` and
    ``attention_mask``, then each attention module's second output (``attn_weights``,
    ``[batch, head, query, key]``) in layer order, as the forward pass reaches them.
    """
    import nnsight

    hf = getattr(model, "_model", model)
    check_implementation(hf.config)
    spec = architectures.resolve(model)
    chosen = _choose_layers(layers, len(architectures.get_path(hf, spec["layers"])))
    args, kwargs = model.inputs
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        raise ValueError("attention views need input_ids to label their tokens: trace token ids or text, not inputs_embeds")
    mask = kwargs.get("attention_mask")
    patterns = []
    for layer in chosen:
        weights = architectures.component(model, spec, "attn", layer).output[1]
        if weights is None:  # a config that says eager but a module that skipped the weights
            raise AttentionUnavailableError(f"layer {layer}'s attention returned no weights; load the model "
                                            "with attn_implementation=\"eager\"")
        patterns.append(weights.detach().float().cpu())
    return nnsight.save({
        "layers": chosen, "patterns": torch.stack(patterns), "token_ids": tokens.cpu(),
        "attention_mask": torch.ones_like(tokens).cpu() if mask is None else mask.cpu(),
    })


def nnsight_result(saved: dict, model) -> AttentionResult:
    """The ``AttentionResult`` of what ``trace_patterns`` saved inside a trace of ``model``."""
    if not isinstance(saved, dict) or "patterns" not in saved:
        raise TypeError(f"expected what attention.trace_patterns(model) returned inside a trace, got {type(saved).__name__}")
    return _result(saved["layers"], saved["patterns"], saved["token_ids"], saved["attention_mask"], model.tokenizer)


def run_nnsight(model, prompt: Union[str, list[str]], layers: Optional[list[int]] = None) -> AttentionResult:
    """Trace ``model`` on ``prompt`` (locally) and return its attention patterns: the one-call form."""
    check_implementation(getattr(model, "_model", model).config)
    with torch.no_grad(), model.trace(prompt):
        saved = trace_patterns(model, layers)
    return nnsight_result(saved, model)
