"""Direct logit attribution and the lens's logit difference on TransformerLens caches (``attribution``,
``logit_diff``, also ``cache.lens.attribution`` / ``cache.lens.logit_diff``) and their one-call forms. The
arithmetic is ``core.dla``'s, shared with nnsight; this module only reads the cache's writes."""

from collections.abc import Sequence
from typing import Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor

from lens_plugins.backends._common import Prompt, eval_mode, one_at_a_time
from lens_plugins.backends.transformer_lens.reader import (
    Sublayers,
    at,
    attribution_hooks,
    cache_model,
    detached,
    has_pos_embed,
    hook_filter,
    is_parallel,
    lens_rows,
    require,
    prompt_inputs,
)
from lens_plugins.backends.transformer_lens.verification import decoder_for, require_heads
from lens_plugins.core import dla, pipeline
from lens_plugins.core.architectures import norm_params
from lens_plugins.core.request import resolve_positions
from lens_plugins.core.rows import select
from lens_plugins.core.defaults import TOP_NEURONS
from lens_plugins.methods.attribution import (
    Attribution,
    LogitDiff,
    TokenSet,
    attribute_parts,
    check_view,
    from_values,
    token_set,
)
from lens_plugins.typecheck import typechecked


def _post_attention_norm(model, layer: int):
    """``(kind, weight, bias, eps)`` of a sandwich norm after attention (Gemma 2/3), or ``None``."""
    norm = getattr(model.blocks[layer], "ln1_post", None)
    if norm is None:
        return None
    original = getattr(norm, "_original_component", None)
    if original is not None:  # TransformerBridge: the Hugging Face norm, with Gemma's 1 + w
        return detached(norm_params(original))
    return "rmsnorm", norm.w.detach(), None, float(model.cfg.eps)  # HookedTransformer RMSNorm (w includes the 1)


def _heads(cache, layer: int, position: int) -> tuple[Tensor, Tensor]:
    """Per-head writes ``[batch, head, d]`` and the output bias ``[batch, d]``: the cache's head results
    (``hook_result``) if it has them, else ``hook_z @ W_O``; through the sandwich norm, frozen at the real
    attention output, when the model has one."""
    model = cache.model
    result_hook = f"blocks.{layer}.attn.hook_result"
    if result_hook in cache.cache_dict:
        heads = at(cache, result_hook, position).float()
    else:
        require(cache, [f"blocks.{layer}.attn.hook_z"], "attribution=True")
        z = at(cache, f"blocks.{layer}.attn.hook_z", position).float()
        heads = torch.einsum("bhk,hkd->bhd", z, model.W_O[layer].detach().float())
    b_O = getattr(model, "b_O", None)
    bias = torch.zeros_like(heads[:, 0]) if b_O is None else b_O[layer].detach().float().expand_as(heads[:, 0])
    return dla.through_post_norm(heads, bias, _post_attention_norm(model, layer))


def cache_parts(cache, position: int = -1, attention_mask: Optional[Tensor] = None) -> dict[str, Optional[Tensor]]:
    """What the residual stream holds at ``position``, split into the writes DLA attributes (the ``parts``
    of ``core.dla.attribute``): embeddings, per-head writes and output biases, each attention
    and MLP write (``hook_attn_out`` / ``hook_mlp_out``: after a sandwich norm), and the final residual."""
    model = cache_model(cache)
    n = model.cfg.n_layers
    require(cache, attribution_hooks(model), "attribution=True")
    first = cache["blocks.0.hook_resid_pre"]
    lead = (1, first.shape[0]) if first.dim() == 2 else tuple(first.shape[:2])
    dla.check_position(position, torch.ones(lead, dtype=torch.long) if attention_mask is None else attention_mask.cpu())
    pos_embed = at(cache, "hook_pos_embed", position).float() if has_pos_embed(model) else None
    embed = at(cache, "blocks.0.hook_resid_pre", position).float()
    heads, head_bias = zip(*[_heads(cache, layer, position) for layer in range(n)])
    return {
        "embed": embed if pos_embed is None else embed - pos_embed,
        "pos_embed": pos_embed,
        "heads": torch.stack(heads, 1),
        "head_bias": torch.stack(head_bias, 1),
        "attn": torch.stack([at(cache, f"blocks.{layer}.hook_attn_out", position).float() for layer in range(n)], 1),
        "mlp": torch.stack([at(cache, f"blocks.{layer}.hook_mlp_out", position).float() for layer in range(n)], 1),
        "final": at(cache, f"blocks.{n - 1}.hook_resid_post", position).float(),
    }


def neuron_spec(model) -> dict:
    """What ``dla.check_neurons`` asks of a family, read off the TransformerLens model: a sandwich norm after
    the MLP (``ln2_post``), and whether each MLP has one output projection (``W_out``; a mixture of experts
    has none)."""
    block = model.blocks[0]
    spec = {"post_norms": getattr(block, "ln2_post", None) is not None}
    if getattr(block.mlp, "W_out", None) is not None:
        spec["neuron_out"] = "mlp.W_out"
    return spec


def cache_neurons(cache, position: int) -> list:
    """Per layer ``(acts [batch, d_mlp], W_out [d_mlp, d_model], b_out or None)``: the neuron activations at
    ``position`` (``hook_post``, the input of ``W_out``) and the weights they write through (``neurons`` of
    ``core.dla.attribute``)."""
    model = cache_model(cache)
    require(cache, [f"blocks.{layer}.mlp.hook_post" for layer in range(model.cfg.n_layers)], "attribution=True")
    read = []
    for layer in range(model.cfg.n_layers):
        mlp = model.blocks[layer].mlp
        b_out = getattr(mlp, "b_out", None)
        read.append((at(cache, f"blocks.{layer}.mlp.hook_post", position).float(), mlp.W_out.detach(),
                     None if b_out is None else b_out.detach()))
    return read


@typechecked
def attribution(
    cache,
    target: TokenSet,
    distractor: Optional[TokenSet] = None,
    *,
    by: str = "component",
    position: int = -1,
    attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
    top_neurons: int = TOP_NEURONS,
    effects: int = 0,
) -> Attribution:
    """Direct logit attribution of ``target`` (minus ``distractor``) at ``position`` (the function behind
    ``cache.lens.attribution``). Targets are single-token strings or ids, or lists of them (token sets,
    see ``lens_plugins.methods.attribution``); ``by`` is ``"component"``, ``"layer"``, ``"head"`` or
    ``"neuron"`` (every MLP split into its neurons, the ``top_neurons`` largest shown); ``effects=k`` adds the
    ``k`` tokens each write promotes and suppresses most (``Attribution.tokens``); ``attention_mask`` (for a
    padded batch) refuses a position that is padding. Cache with ``hook_filter(model, attribution=True)``.

    Args:
        cache: an ``ActivationCache`` cached with ``hook_filter(model, attribution=True)``.
        target: the token whose logit is explained: a single-token string or id, or a list of them (a token set).
        distractor: the token subtracted (logit difference); ``None`` explains the target's logit alone.
        by: ``"component"`` (embeddings, each attention and MLP), ``"layer"`` or ``"head"``.
        position: the position explained (negative allowed).
        attention_mask: 1 on real tokens, for a padded batch (a padding position is refused).

    Returns:
        An ``Attribution``: one contribution per part, which with its constant sums to the logit difference.

    Raises:
        LensKeyError: the cache lacks a hook attribution reads (the message names the ``hook_filter`` to use).
        LensValueError: a target that is not one token, a padding position, non-finite residual parts.
    """
    model = cache_model(cache)
    decoder = decoder_for(model, sublayers=True)
    require_heads(model, cache_parts)
    check_view(by)
    neurons = by == "neuron"
    dla.check_neurons(neuron_spec(model) if neurons else None, top_neurons, effects)
    target_ids, target_names = token_set(model.tokenizer, target, decoder.d_vocab)
    distractor_ids, distractor_names = ([], []) if distractor is None else token_set(model.tokenizer, distractor, decoder.d_vocab,
                                                                                             "distractor")
    parts = cache_parts(cache, position, attention_mask)
    values = attribute_parts(parts, decoder, target_ids, distractor_ids,
                             cache_neurons(cache, position) if neurons else None, top_neurons, effects)
    return from_values(values, by=by, position=position, target_names=target_names,
                       distractor_names=distractor_names, parallel=is_parallel(model), tokenizer=model.tokenizer)


@typechecked
def logit_diff(
    cache,
    target: TokenSet,
    distractor: TokenSet,
    *,
    resid_mid: bool = False,
    sublayers: Sublayers = False,
    layers: Optional[Sequence[Union[int, str]]] = None,
    positions: Optional[Union[int, Sequence[int]]] = None,
    lens=None,
    attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
) -> LogitDiff:
    """The lens's ``target`` minus ``distractor`` logit at every row and position (the function behind
    ``cache.lens.logit_diff``); rows, ``layers``, ``positions`` and ``lens`` as in ``logit_lens``;
    ``attention_mask`` (for a padded batch) refuses a position that is padding in any prompt.

    Args:
        cache: an ``ActivationCache`` cached with ``hook_filter(model, ...)`` for the rows asked.
        target: the token (or token set) whose logit comes first.
        distractor: the token (or set) subtracted.
        resid_mid: also read each block's ``hook_resid_mid``.
        sublayers: read after every sublayer.
        layers: rows to keep, by index or label.
        positions: positions to keep; default all.
        lens: a map applied to each row before decoding; default the logit lens.
        attention_mask: 1 on real tokens; a position that is padding in any prompt is refused.

    Returns:
        A ``LogitDiff``: ``values [row, batch, pos]`` of target minus distractor logit, decoded at each row.

    Raises:
        LensValueError: a target that is not one token, or a padding position.
    """
    model, every, read, (batch, seq) = lens_rows(cache, resid_mid, sublayers)
    decoder = decoder_for(model, sublayers=bool(resid_mid or sublayers))
    target_ids, target_names = token_set(model.tokenizer, target, decoder.d_vocab)
    distractor_ids, distractor_names = token_set(model.tokenizer, distractor, decoder.d_vocab, "distractor")
    chosen = select(every, layers)
    chosen_positions = resolve_positions(positions, seq)
    values = pipeline.logit_diff(read, chosen, chosen_positions, decoder, target_ids, distractor_ids, batch,
                                 lens, None if attention_mask is None else attention_mask.cpu())
    return LogitDiff([row.label for row in chosen], chosen_positions, values.cpu(), target_names, distractor_names)


@one_at_a_time
@typechecked
def run_attribution(
    model,
    prompt: Prompt,
    target: TokenSet,
    distractor: Optional[TokenSet] = None,
    *,
    by: str = "component",
    position: int = -1,
    padding_side: Optional[str] = None,
    prepend_bos: Optional[bool] = None,
    top_neurons: int = TOP_NEURONS,
    effects: int = 0,
) -> Attribution:
    """Run ``model`` on ``prompt`` caching only what attribution reads, then attribute: the one-call form,
    with ``run_logit_lens``'s guards (context length, no truncation, padding with its mask, eval mode) and
    its ``prepend_bos``.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer``.
        prompt: a text or a list of texts, or model inputs (a processor's output: ``input_ids``, ``pixel_values`` ...).
        target: the token whose logit is explained (string, id, or a list of them).
        distractor: the token subtracted; ``None`` explains the target's logit alone.
        by: ``"component"``, ``"layer"`` or ``"head"``.
        position: the position explained.
        padding_side: ``"left"`` or ``"right"`` for a batch.
        prepend_bos: as ``run_logit_lens``.

    Returns:
        The ``Attribution`` of ``attribution`` on the cached run.

    Raises:
        LensValueError: as ``attribution``, and for an empty or too long prompt.
    """
    tokens, mask, extra = prompt_inputs(model, prompt, padding_side, prepend_bos)
    with eval_mode(model), torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, **extra, names_filter=hook_filter(model, attribution=True))
        return attribution(cache, target, distractor, by=by, position=position, attention_mask=mask,
                           top_neurons=top_neurons, effects=effects)


@one_at_a_time
@typechecked
def run_logit_diff(
    model,
    prompt: Prompt,
    target: TokenSet,
    distractor: TokenSet,
    *,
    resid_mid: bool = False,
    sublayers: Sublayers = False,
    padding_side: Optional[str] = None,
    prepend_bos: Optional[bool] = None,
    **kwargs,
) -> LogitDiff:
    """Run ``model`` on ``prompt`` caching only the lens hooks, then ``logit_diff``: the one-call form
    (``padding_side`` and ``prepend_bos`` as in ``run_logit_lens``)."""
    tokens, mask, extra = prompt_inputs(model, prompt, padding_side, prepend_bos)
    with eval_mode(model), torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, **extra,
                                        names_filter=hook_filter(model, resid_mid, sublayers))
        return logit_diff(cache, target, distractor, resid_mid=resid_mid, sublayers=sublayers,
                          attention_mask=mask, **kwargs)

__all__ = ["neuron_spec", "cache_neurons", "cache_parts", "attribution", "logit_diff", "run_attribution", "run_logit_diff"]
