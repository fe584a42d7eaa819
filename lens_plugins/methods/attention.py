"""Attention patterns: where each head looks, as a result that plots without a model (``AttentionResult``).

The logit lens says what the model thinks at each layer; the attention pattern says where it looks. An
``AttentionResult`` holds the softmaxed patterns ``[layer, batch, head, query, key]`` with the prompt's tokens,
so its figures (``head_view``, ``model_view``, ``sink_figure`` in ``lens_plugins.plot.attention``) need no model.

Where the patterns come from (``lp.transformer_lens.run_attention`` / ``lp.nnsight.run_attention``):

- TransformerLens (a ``TransformerBridge`` or a 3.9 ``HookedTransformer``): ``blocks.{L}.attn.hook_pattern``,
  cached with ``names_filter=lp.transformer_lens.attention_hook_filter(model)``.
- nnsight on Hugging Face transformers 5 (``core/trace/attention.py``, locally or on an NDIF server): each
  attention module returns ``(attn_output, attn_weights)``, and only the ``"eager"`` implementation fills
  ``attn_weights`` (its explicit softmax); ``"sdpa"``, the flash kernels and ``"flex_attention"`` return
  ``None``. The trace switches the model's config to eager for the one forward pass it reads (a server
  loads its models with its own implementation) and restores it; patterns that show the switch came too
  late (weight on later tokens) raise ``AttentionUnavailableError`` naming the fix.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins._aliases import deprecated_names
from lens_plugins.core.errors import LensIndexError, LensValueError
from lens_plugins.tokens import token_strings
from lens_plugins.typecheck import typechecked


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
    token_labels: Optional[list[list[str]]] = None  # per prompt and position, as ``LensResult.token_labels``

    def __post_init__(self) -> None:
        if len(self.layers) != self.patterns.shape[0]:
            raise LensValueError(f"{len(self.layers)} layer indices for {self.patterns.shape[0]} layers of patterns")
        if self.patterns.shape[-1] != self.token_ids.shape[1] or self.patterns.shape[-2] != self.token_ids.shape[1]:
            raise LensValueError(f"patterns are {tuple(self.patterns.shape[-2:])} query x key positions for a "
                             f"prompt of {self.token_ids.shape[1]} tokens")

    @property
    def n_heads(self) -> int:
        return self.patterns.shape[2]

    def token(self, token_id: int) -> str:
        return self.vocab_strings.get(int(token_id), f"<{int(token_id)}>")

    def str_tokens(self, batch: int = 0) -> list[str]:
        if self.token_labels is not None:
            return list(self.token_labels[batch])
        return [self.token(i) for i in self.token_ids[batch].tolist()]

    def layer_index(self, layer: int) -> int:
        """Index along the ``layer`` axis of model layer ``layer`` (negative counts from the last stored)."""
        if -len(self.layers) <= layer < 0:
            return len(self.layers) + layer
        if layer not in self.layers:
            raise LensIndexError(f"layer {layer} was not read; this result holds layers {self.layers}")
        return self.layers.index(layer)

    def head(self, layer: int, head: int, batch: int = 0) -> Float[Tensor, "query key"]:
        if not -self.n_heads <= head < self.n_heads:
            raise LensIndexError(f"head {head} is out of range: layers here have {self.n_heads} heads, 0..{self.n_heads - 1}")
        if not 0 <= batch < self.token_ids.shape[0]:
            raise LensIndexError(f"batch {batch} is out of range: this result holds {self.token_ids.shape[0]} prompt(s)")
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
        from lens_plugins.plot.attention import head_view

        return head_view(self, layer, head, batch)

    def model_view(self, batch: int = 0):
        from lens_plugins.plot.attention import model_view

        return model_view(self, batch)


def _mask(tokens: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    if attention_mask is None:
        return torch.ones_like(tokens, dtype=torch.long)
    if attention_mask.shape != tokens.shape:
        raise LensValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(tokens.shape)}")
    return attention_mask.to(torch.long).cpu()


def attention_result(layers, patterns, tokens, attention_mask, tokenizer) -> AttentionResult:
    tokens = tokens.cpu().to(torch.long)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    return AttentionResult(
        layers=layers, patterns=patterns.detach().float().cpu(), token_ids=tokens,
        attention_mask=_mask(tokens, attention_mask), vocab_strings=token_strings(tokenizer, tokens),
    )



__getattr__ = deprecated_names(__name__, {
    "run_transformer_lens": ("lens_plugins.backends.transformer_lens", "run_attention"),
    "from_cache": ("lens_plugins.backends.transformer_lens", "attention"),
    "hook_filter": ("lens_plugins.backends.transformer_lens", "attention_hook_filter"),
    "run_nnsight": ("lens_plugins.backends.nnsight", "run_attention"),
    "trace_patterns": ("lens_plugins.backends.nnsight", "attention"),
    "nnsight_result": ("lens_plugins.backends.nnsight", "attention_result"),
})

__all__ = ["AttentionResult", "attention_result"]
