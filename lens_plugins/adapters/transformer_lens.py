"""The logit lens on TransformerLens activation caches (``TransformerBridge`` and ``HookedTransformer``).

``import lens_plugins`` registers ``ActivationCache.lens``, so that after
``logits, cache = model.run_with_cache(prompt, names_filter=hook_filter())`` a notebook can ask
``cache.lens.logit_lens()``. The rows are TransformerLens's accumulated residual stream:
``blocks.0.hook_resid_pre`` ("embed"), optionally each ``hook_resid_mid`` ("3_mid"), each later
``hook_resid_pre`` ("3_pre"), and the last block's ``hook_resid_post`` ("29_post"), which the model
itself decodes, so the last row reproduces the model's own log-probabilities.

``logit_lens(sublayers=True)`` has a row after every sublayer instead ("embed", "0_attn", "0_mlp", ...:
``hook_resid_mid`` and ``hook_resid_post``); a parallel-block model (GPT-J, NeoX) has no residual between
its attention and MLP, so its rows are "0_attn+mlp", ... ``sublayers="outputs"`` decodes each sublayer's
own write alone ("0_attn_out", "0_mlp_out", ..., nostalgebraist's sub-block view), with the final residual
kept as the last row. ``cache.lens.attribution`` and ``cache.lens.logit_diff`` are direct logit
attribution and the lens's logit difference (``lens_plugins.attribution``).
"""

from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins import tokens as token_utils
from lens_plugins.attribution import Attribution, LogitDiff, TokenSet, attribute_parts, from_values, token_set
from lens_plugins.core import dla, pipeline
from lens_plugins.core.architectures import norm_params
from lens_plugins.core.reductions import DEFAULT_LENS as DEFAULT_LENS_REDUCTIONS
from lens_plugins.core.request import resolve_positions
from lens_plugins.core.rows import Row, plan, select
from lens_plugins.decoder import Decoder
from lens_plugins.logit_lens import (
    DEFAULT_TOKEN_CHUNK, DEFAULT_TOP_K, DEFAULT_VOCAB_CHUNK, TokenSets, check_context, check_prompts, eval_mode,
    pad_batch, run_lens,
)
from lens_plugins.models import context_length
from lens_plugins.result import LensResult
from lens_plugins.typecheck import typechecked

__all__ = [
    "logit_lens", "logit_diff", "attribution", "run_logit_lens", "run_logit_diff", "run_attribution",
    "decoder_for", "hook_filter", "residual_stack", "hook_name", "run_generation_lens", "dola_generate",
    "run_decoder_lens", "patchscope",
]

_NORMALIZATION_KINDS = {"LN": "layernorm", "LNPre": "layernorm", "RMS": "rmsnorm", "RMSPre": "rmsnorm", None: "none"}


Sublayers = Union[bool, str]  # False, True (residual after each sublayer) or "outputs" (each write alone)
ATTRIBUTION_SUFFIXES = ("hook_attn_out", "hook_mlp_out", "attn.hook_z")


def hook_filter(
    model=None, resid_mid: bool = False, sublayers: Sublayers = False, attribution: bool = False
) -> Union[list[str], Callable[[str], bool]]:
    """What ``run_with_cache(names_filter=...)`` must keep for the lens, and nothing else.

    With a model, the exact hook names; without one, a predicate (it keeps every ``hook_resid_post``,
    since it cannot know which block is last). ``resid_mid`` / ``sublayers`` add what ``logit_lens`` reads
    with those rows, ``attribution`` what ``attribution`` reads (each layer's attention and MLP writes,
    ``hook_z``, positional embeddings).
    """
    if model is not None:
        names = ["hook_embed"]
        names += [hook_name(row) for row in plan(model.cfg.n_layers, False, False, is_parallel(model))]
        if resid_mid or sublayers:
            names += [hook_name(row) for row in plan(model.cfg.n_layers, resid_mid, sublayers, is_parallel(model))]
        if attribution:
            names += attribution_hooks(model)
        return list(dict.fromkeys(names))
    suffixes = ("hook_resid_pre", "hook_resid_post") + (("hook_resid_mid",) if resid_mid or sublayers else ())
    suffixes += ("hook_attn_out", "hook_mlp_out") if sublayers == "outputs" else ()
    suffixes += ATTRIBUTION_SUFFIXES + ("hook_pos_embed",) if attribution else ()
    return lambda name: name == "hook_embed" or name.endswith(suffixes)


def is_parallel(model) -> bool:
    """GPT-J / NeoX style blocks: attention and MLP read the same input, so there is no ``hook_resid_mid``."""
    return bool(getattr(model.cfg, "parallel_attn_mlp", False))


_SITE_HOOKS = {"embed": "hook_resid_pre", "pre": "hook_resid_pre", "mid": "hook_resid_mid", "attn": "hook_resid_mid",
               "post": "hook_resid_post", "mlp": "hook_resid_post", "attn+mlp": "hook_resid_post",
               "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}


def hook_name(row: Row) -> str:
    """The reader: the TransformerLens hook a row is read from (``Row(3, "mid")`` -> ``blocks.3.hook_resid_mid``)."""
    return f"blocks.{row.layer}.{_SITE_HOOKS[row.site]}"


def attribution_hooks(model) -> list[str]:
    """The hooks ``attribution`` reads (``hook_pos_embed`` only where the model has one)."""
    n = model.cfg.n_layers
    names = ["blocks.0.hook_resid_pre", f"blocks.{n - 1}.hook_resid_post"]
    names += ["hook_pos_embed"] if has_pos_embed(model) else []
    for layer in range(n):
        names += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.attn.hook_z"]
    return names


def has_pos_embed(model) -> bool:
    """Learned absolute positional embeddings (GPT-2, OPT), which DLA attributes on their own."""
    return getattr(model.cfg, "positional_embedding_type", "standard") == "standard"


def decoder_for(model) -> Decoder:
    """The decoder of a ``HookedTransformer`` or ``TransformerBridge``, in raw or compatibility mode.

    Norm parameters are read from the live ``ln_final`` (folded models carry none), so a bridge whose
    layer norms were folded into ``W_U`` decodes through the folded weights exactly as the model does.
    """
    cfg = model.cfg
    normalization = getattr(cfg, "normalization_type", None)
    if normalization not in _NORMALIZATION_KINDS:
        raise ValueError(f"unsupported normalization_type {normalization!r}; expected one of {list(_NORMALIZATION_KINDS)}")
    kind = _NORMALIZATION_KINDS[normalization]
    weight = bias = None
    eps = float(getattr(cfg, "eps", 1e-5))
    ln_final = getattr(model, "ln_final", None)
    original = getattr(ln_final, "_original_component", None)
    if original is not None:  # TransformerBridge: the wrapped Hugging Face norm
        kind, weight, bias, eps = _detached(norm_params(original))
    elif ln_final is not None and normalization in ("LN", "RMS"):  # HookedTransformer LayerNorm / RMSNorm
        weight = ln_final.w.detach()
        bias = getattr(ln_final, "b", None)
        bias = None if bias is None else bias.detach()
    softcap = getattr(cfg, "output_logits_soft_cap", None)
    b_U = getattr(model, "b_U", None)
    return Decoder(
        norm_kind=kind,
        W_U=model.W_U.detach(),
        norm_weight=weight,
        norm_bias=bias,
        norm_eps=eps,
        b_U=None if b_U is None else b_U.detach(),
        softcap=float(softcap) if softcap is not None and softcap > 0 else None,
    )


def _detached(params: tuple) -> tuple:
    return tuple(p.detach() if isinstance(p, Tensor) else p for p in params)


def row_plan(cache, resid_mid: bool = False, sublayers: Sublayers = False) -> list[Row]:
    """This cache's model's rows (``core.rows.plan``)."""
    return plan(cache.model.cfg.n_layers, resid_mid, sublayers, is_parallel(cache.model))


def reader(cache, fix: str = ""):
    """``read(rows, positions=None) -> [rows, batch, positions or seq, d_model]`` from the cache's hooks, cut to
    ``positions`` (a list or a slice of the sequence axis) before they are stacked, with a fix-it message for
    each hook the cache lacks (``fix``: the ``hook_filter`` arguments that cache it)."""

    def read(rows: Sequence[Row], positions: Union[list[int], slice, None] = None) -> Tensor:
        hooks = [hook_name(row) for row in rows]
        _require(cache, hooks, fix)
        stack = torch.stack([cache[h] if positions is None else cache[h][..., positions, :] for h in hooks])
        if stack.dim() == 3:  # a cache taken with remove_batch_dim=True
            stack = stack.unsqueeze(1)
        return stack.detach()

    return read


def _fix(resid_mid: bool, sublayers: Sublayers) -> str:
    return f"sublayers={sublayers!r}" if sublayers else ("resid_mid=True" if resid_mid else "")


def residual_stack(
    cache, resid_mid: bool = False, sublayers: Sublayers = False
) -> tuple[Float[Tensor, "row batch seq d_model"], list[str]]:
    """The lens rows from a cache, with a fix-it message for each hook the cache lacks."""
    rows = row_plan(cache, resid_mid, sublayers)
    return reader(cache, _fix(resid_mid, sublayers))(rows), [row.label for row in rows]


def _require(cache, hooks: list[str], fix: str) -> None:
    """Name the first hook the cache lacks and the ``hook_filter`` call that caches it."""
    missing = [h for h in hooks if h not in cache.cache_dict]
    if missing:
        raise KeyError(
            f"the cache has no {missing[0]!r}" + (f" (and {len(missing) - 1} more hooks)" if len(missing) > 1 else "")
            + f"; run model.run_with_cache(prompt, names_filter=lens_plugins.transformer_lens.hook_filter({fix}))"
        )


def recover_tokens(cache) -> Int[Tensor, "batch seq"]:
    """The prompt's token ids, read back from ``hook_embed`` (an exact row of ``W_E``, up to Gemma-style
    scaling), so that a cache alone is enough to know what was predicted where."""
    if "hook_embed" not in cache.cache_dict:
        raise KeyError(
            "the lens needs the prompt's tokens: pass tokens=model.to_tokens(prompt), or cache 'hook_embed' "
            "(lens_plugins.transformer_lens.hook_filter() includes it)"
        )
    embed = _embed(cache)
    W_E = cache.model.W_E.detach().float()
    if embed.shape[-1] != W_E.shape[-1]:
        raise ValueError(f"hook_embed has width {embed.shape[-1]} but this model's W_E has {W_E.shape[-1]}: "
                         "the cache comes from a different model")
    unit = W_E / W_E.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    # Nearest row a few hundred positions at a time: [tokens, vocab] scores for a long prompt would not fit.
    ids = torch.cat([(chunk @ unit.T).argmax(-1) for chunk in embed.split(256, dim=1)], dim=1)
    matched = W_E[ids]
    scale = (embed * matched).sum(-1, keepdim=True) / (matched * matched).sum(-1, keepdim=True).clamp(min=1e-12)
    error = (embed - scale * matched).norm(dim=-1) / embed.norm(dim=-1).clamp(min=1e-12)
    if error.max() > 1e-4:
        raise ValueError(
            "hook_embed is not a row of this model's W_E (relative error "
            f"{error.max().item():.2g}): the cache comes from a different model. Pass tokens= explicitly."
        )
    return ids


def _embed(cache) -> Tensor:
    embed = cache["hook_embed"].detach().float()
    return embed.unsqueeze(0) if embed.dim() == 2 else embed


def check_tokens_match_embed(cache, tokens: Tensor, attention_mask: Optional[Tensor] = None) -> None:
    """With ``tokens`` given, refuse a cache whose embeddings are not this model's embeddings of those tokens
    (up to Gemma-style scaling): another model's cache, or other tokens. The embeddings are ``hook_embed``
    when cached, else block 0's input less the positional embeddings (``hook_pos_embed``, or ``W_pos`` at the
    positions the model used: counted from the first real token when ``attention_mask`` marks padding), so
    a same-width cache from another model is refused whichever hooks it kept. Padding is not checked."""
    embed = _token_embeddings(cache, attention_mask)
    if embed is None:
        return
    W_E = cache.model.W_E.detach().float()
    if embed.shape[-1] != W_E.shape[-1]:
        return  # the decoder's width check names this
    expected = W_E[tokens.to(W_E.device)]
    scale = (embed * expected).sum(-1, keepdim=True) / (expected * expected).sum(-1, keepdim=True).clamp(min=1e-12)
    error = (embed - scale * expected).norm(dim=-1) / embed.norm(dim=-1).clamp(min=1e-12)
    if attention_mask is not None:
        error = error * attention_mask.to(error.device)
    if error.max() > 1e-4:
        source = "hook_embed" if "hook_embed" in cache.cache_dict else "the embedding row (blocks.0.hook_resid_pre)"
        raise ValueError(
            f"{source} is not this model's embedding of the tokens (relative error {error.max().item():.2g}): "
            "the cache comes from a different model, or tokens= are not the prompt it was run on"
        )


def _token_embeddings(cache, attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """``[batch, seq, d_model]`` token embeddings as the cache holds them, or ``None`` where they cannot be
    told apart from learned positions (no ``hook_pos_embed`` and no ``W_pos``)."""
    if "hook_embed" in cache.cache_dict:
        return _embed(cache)
    resid = cache["blocks.0.hook_resid_pre"].detach().float()
    resid = resid.unsqueeze(0) if resid.dim() == 2 else resid
    if not has_pos_embed(cache.model):
        return resid
    if "hook_pos_embed" in cache.cache_dict:
        pos = cache["hook_pos_embed"].detach().float()
        return resid - (pos.unsqueeze(0) if pos.dim() == 2 else pos)
    W_pos = getattr(cache.model, "W_pos", None)
    if W_pos is None:
        return None
    if attention_mask is None:
        positions = torch.arange(resid.shape[1]).expand(resid.shape[:2])
    else:  # as the model numbers them under padding: from 0 at the first real token
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return resid - W_pos.detach().float()[positions.to(W_pos.device)]


@typechecked
def logit_lens(
    cache,
    *,
    tokens: Optional[Int[Tensor, "batch seq"]] = None,
    attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
    resid_mid: bool = False,
    sublayers: Sublayers = False,
    layers: Optional[Sequence[Union[int, str]]] = None,
    positions: Optional[Union[int, Sequence[int]]] = None,
    top_k: int = DEFAULT_TOP_K,
    targets: Sequence[token_utils.TargetSpec] = (),
    token_sets: Optional[TokenSets] = None,
    reductions: Sequence[str] = DEFAULT_LENS_REDUCTIONS,
    lens=None,
    vocab_chunk: Optional[int] = DEFAULT_VOCAB_CHUNK,
    token_chunk: Optional[int] = DEFAULT_TOKEN_CHUNK,
    precision: str = "float32",
) -> LensResult:
    """The logit lens of a TransformerLens ``ActivationCache`` (the function behind ``cache.lens.logit_lens``).

    ``tokens`` defaults to the ids recovered from ``hook_embed``; ``attention_mask`` (1 on real tokens, as
    passed to ``run_with_cache`` for a padded batch) marks padding, which scores nothing and is left out of
    every average; ``resid_mid`` / ``sublayers`` choose the rows (module docstring) and ``layers`` selects
    among them by index or label (the final row is always kept as the reference); ``positions`` (prompt
    indices, negative allowed) defaults to all; ``targets`` are single-token strings or ids whose log-prob
    and rank are reported at every row and position; ``token_sets`` maps names to several tokens whose
    probabilities add up; ``reductions`` names what to compute (``lens_plugins.core.reductions.LENS``);
    ``lens`` maps each row before decoding (``lens_plugins.lenses``; default the logit lens).
    """
    model, every, read, (batch, seq) = _lens_rows(cache, resid_mid, sublayers)
    check_context(seq, context_length(model))
    if tokens is None:
        tokens = recover_tokens(cache)
    if tuple(tokens.shape) != (batch, seq):
        raise ValueError(f"tokens have shape {tuple(tokens.shape)} but the cache holds [batch, seq] = {(batch, seq)}")
    check_tokens_match_embed(cache, tokens, attention_mask)
    return run_lens(
        read, every, layers, tokens.to(torch.long).cpu(), model.tokenizer, decoder_for(model),
        attention_mask=None if attention_mask is None else attention_mask.to(torch.long).cpu(),
        positions=positions, top_k=top_k, targets=targets, token_sets=token_sets, reductions=reductions,
        lens=lens, vocab_chunk=vocab_chunk, token_chunk=token_chunk, precision=precision,
    )


def _lens_rows(cache, resid_mid: bool, sublayers: Sublayers):
    """``(model, row plan, reader, (batch, seq))`` of a cache, refusing a cache that lacks a row's hook."""
    model = _cache_model(cache)
    every = row_plan(cache, resid_mid, sublayers)
    fix = _fix(resid_mid, sublayers)
    _require(cache, [hook_name(row) for row in every], fix)
    first = cache[hook_name(every[0])]
    shape = (1, first.shape[0]) if first.dim() == 2 else tuple(first.shape[:2])
    return model, every, reader(cache, fix), shape


def _cache_model(cache):
    """The model a cache came from, refused in training mode (dropout: the cache is not its prediction)."""
    model = getattr(cache, "model", None)
    if model is None:
        raise ValueError("this ActivationCache has no model attached; build it with model.run_with_cache(...)")
    if getattr(model, "training", False):
        raise ValueError("the model is in training mode (dropout on), so its cache is not its prediction: call model.eval()")
    return model


def _at(cache, hook: str, position: int) -> Tensor:
    """One hook's activation at ``position``, ``[batch, ...]``, for caches with or without a batch dim."""
    value = cache[hook].detach()
    if cache.has_batch_dim is False:
        value = value.unsqueeze(0)
    return value[:, position]


def _post_attention_norm(model, layer: int):
    """``(kind, weight, bias, eps)`` of a sandwich norm after attention (Gemma 2/3), or ``None``."""
    norm = getattr(model.blocks[layer], "ln1_post", None)
    if norm is None:
        return None
    original = getattr(norm, "_original_component", None)
    if original is not None:  # TransformerBridge: the Hugging Face norm, with Gemma's 1 + w
        return _detached(norm_params(original))
    return "rmsnorm", norm.w.detach(), None, float(model.cfg.eps)  # HookedTransformer RMSNorm (w includes the 1)


def _heads(cache, layer: int, position: int) -> tuple[Tensor, Tensor]:
    """Per-head writes ``[batch, head, d]`` and the output bias ``[batch, d]``: the cache's head results
    (``hook_result``) if it has them, else ``hook_z @ W_O``; through the sandwich norm, frozen at the real
    attention output, when the model has one."""
    model = cache.model
    result_hook = f"blocks.{layer}.attn.hook_result"
    if result_hook in cache.cache_dict:
        heads = _at(cache, result_hook, position).float()
    else:
        _require(cache, [f"blocks.{layer}.attn.hook_z"], "attribution=True")
        z = _at(cache, f"blocks.{layer}.attn.hook_z", position).float()
        heads = torch.einsum("bhk,hkd->bhd", z, model.W_O[layer].detach().float())
    b_O = getattr(model, "b_O", None)
    bias = torch.zeros_like(heads[:, 0]) if b_O is None else b_O[layer].detach().float().expand_as(heads[:, 0])
    return dla.through_post_norm(heads, bias, _post_attention_norm(model, layer))


def cache_parts(cache, position: int = -1, attention_mask: Optional[Tensor] = None) -> dict[str, Optional[Tensor]]:
    """What the residual stream holds at ``position``, split into the writes DLA attributes (the ``parts``
    of ``core.dla.attribute``): embeddings, per-head writes and output biases, each attention
    and MLP write (``hook_attn_out`` / ``hook_mlp_out``: after a sandwich norm), and the final residual."""
    model = _cache_model(cache)
    n = model.cfg.n_layers
    _require(cache, attribution_hooks(model), "attribution=True")
    first = cache["blocks.0.hook_resid_pre"]
    lead = (1, first.shape[0]) if first.dim() == 2 else tuple(first.shape[:2])
    dla.check_position(position, torch.ones(lead, dtype=torch.long) if attention_mask is None else attention_mask.cpu())
    pos_embed = _at(cache, "hook_pos_embed", position).float() if has_pos_embed(model) else None
    embed = _at(cache, "blocks.0.hook_resid_pre", position).float()
    heads, head_bias = zip(*[_heads(cache, layer, position) for layer in range(n)])
    return {
        "embed": embed if pos_embed is None else embed - pos_embed,
        "pos_embed": pos_embed,
        "heads": torch.stack(heads, 1),
        "head_bias": torch.stack(head_bias, 1),
        "attn": torch.stack([_at(cache, f"blocks.{layer}.hook_attn_out", position).float() for layer in range(n)], 1),
        "mlp": torch.stack([_at(cache, f"blocks.{layer}.hook_mlp_out", position).float() for layer in range(n)], 1),
        "final": _at(cache, f"blocks.{n - 1}.hook_resid_post", position).float(),
    }


@typechecked
def attribution(
    cache,
    target: TokenSet,
    distractor: Optional[TokenSet] = None,
    *,
    by: str = "component",
    position: int = -1,
    attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
) -> Attribution:
    """Direct logit attribution of ``target`` (minus ``distractor``) at ``position`` (the function behind
    ``cache.lens.attribution``). Targets are single-token strings or ids, or lists of them (token sets,
    see ``lens_plugins.attribution``); ``by`` is ``"component"``, ``"layer"`` or ``"head"``;
    ``attention_mask`` (for a padded batch) refuses a position that is padding. Cache with
    ``hook_filter(model, attribution=True)``."""
    model = _cache_model(cache)
    decoder = decoder_for(model)
    target_ids, target_names = token_set(model.tokenizer, target, decoder.d_vocab)
    distractor_ids, distractor_names = ([], []) if distractor is None else token_set(model.tokenizer, distractor, decoder.d_vocab)
    values = attribute_parts(cache_parts(cache, position, attention_mask), decoder, target_ids, distractor_ids)
    return from_values(values, by=by, position=position, target_names=target_names,
                       distractor_names=distractor_names, parallel=is_parallel(model))


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
) -> LogitDiff:
    """The lens's ``target`` minus ``distractor`` logit at every row and position (the function behind
    ``cache.lens.logit_diff``); rows, ``layers``, ``positions`` and ``lens`` as in ``logit_lens``."""
    model, every, read, (batch, seq) = _lens_rows(cache, resid_mid, sublayers)
    decoder = decoder_for(model)
    target_ids, target_names = token_set(model.tokenizer, target, decoder.d_vocab)
    distractor_ids, distractor_names = token_set(model.tokenizer, distractor, decoder.d_vocab)
    chosen = select(every, layers)
    chosen_positions = resolve_positions(positions, seq)
    values = pipeline.logit_diff(read, chosen, chosen_positions, decoder.tensors(), target_ids, distractor_ids, batch,
                                 lens)
    return LogitDiff([row.label for row in chosen], chosen_positions, values.cpu(), target_names, distractor_names)


def _tokenize(model, prompt: Union[str, list[str]], padding_side: Optional[str]) -> tuple[Tensor, Tensor]:
    """``(tokens, attention_mask)`` of the one-call forms: prompts checked, never truncated (a prompt longer
    than the context is refused), a batch padded on ``padding_side`` (default the tokenizer's)."""
    prompts = check_prompts(prompt)
    sequences = [model.to_tokens(p, truncate=False)[0] for p in prompts]
    check_context(max(len(s) for s in sequences), context_length(model))
    tokenizer = model.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens, mask = pad_batch(sequences, pad_id, padding_side or getattr(tokenizer, "padding_side", "right"))
    return tokens.to(sequences[0].device), mask.to(sequences[0].device)


@typechecked
def run_attribution(
    model,
    prompt: Union[str, list[str]],
    target: TokenSet,
    distractor: Optional[TokenSet] = None,
    *,
    by: str = "component",
    position: int = -1,
    padding_side: Optional[str] = None,
) -> Attribution:
    """Run ``model`` on ``prompt`` caching only what attribution reads, then attribute: the one-call form,
    with ``run_logit_lens``'s guards (context length, no truncation, padding with its mask, eval mode)."""
    tokens, mask = _tokenize(model, prompt, padding_side)
    with eval_mode(model), torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=hook_filter(model, attribution=True))
        return attribution(cache, target, distractor, by=by, position=position, attention_mask=mask)


@typechecked
def run_logit_diff(
    model,
    prompt: Union[str, list[str]],
    target: TokenSet,
    distractor: TokenSet,
    *,
    resid_mid: bool = False,
    sublayers: Sublayers = False,
    padding_side: Optional[str] = None,
    **kwargs,
) -> LogitDiff:
    """Run ``model`` on ``prompt`` caching only the lens hooks, then ``logit_diff``: the one-call form."""
    tokens, mask = _tokenize(model, prompt, padding_side)
    with eval_mode(model), torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask,
                                        names_filter=hook_filter(model, resid_mid, sublayers))
        return logit_diff(cache, target, distractor, resid_mid=resid_mid, sublayers=sublayers, **kwargs)


@typechecked
def run_logit_lens(
    model,
    prompt: Union[str, list[str]],
    *,
    resid_mid: bool = False,
    sublayers: Sublayers = False,
    padding_side: Optional[str] = None,
    **kwargs,
) -> LensResult:
    """Run ``model`` on ``prompt`` caching only the lens hooks, then decode: the one-call form.

    A batch of prompts is padded on ``padding_side`` ("left" or "right"; default the tokenizer's) and run
    with its attention mask, so each prompt's lens is its lens alone; ``result.attention_mask`` marks the
    padding. A prompt longer than the model's context is refused (``to_tokens`` would truncate it). A
    model in training mode runs in eval mode for the call, with a warning, and is put back.
    """
    tokens, mask = _tokenize(model, prompt, padding_side)
    with eval_mode(model), torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask,
                                        names_filter=hook_filter(model, resid_mid, sublayers))
        return logit_lens(cache, tokens=tokens, attention_mask=mask, resid_mid=resid_mid, sublayers=sublayers,
                          **kwargs)


class CacheLens:
    """The ``cache.lens`` accessor: lens operations bound to one ``ActivationCache``."""

    def __init__(self, cache):
        self._cache = cache

    def logit_lens(self, **kwargs) -> LensResult:
        return logit_lens(self._cache, **kwargs)

    def decoder(self) -> Decoder:
        return decoder_for(self._cache.model)

    def stack(self, resid_mid: bool = False, sublayers: Sublayers = False) -> tuple[Tensor, list[str]]:
        return residual_stack(self._cache, resid_mid, sublayers)

    def attribution(self, target, distractor=None, **kwargs) -> Attribution:
        return attribution(self._cache, target, distractor, **kwargs)

    def logit_diff(self, target, distractor, **kwargs) -> LogitDiff:
        return logit_diff(self._cache, target, distractor, **kwargs)


class _Accessor:
    """A descriptor like pandas' accessors: ``cache.lens`` builds a ``CacheLens`` on access."""

    def __get__(self, cache, owner=None):
        if cache is None:
            return CacheLens
        return CacheLens(cache)


def register_accessor(cache_class) -> None:
    if not isinstance(cache_class.__dict__.get("lens"), _Accessor):
        cache_class.lens = _Accessor()



# The verbs of the other methods, in their own modules.
from lens_plugins.adapters.transformer_lens_decoder_lens import run_decoder_lens  # noqa: E402
from lens_plugins.adapters.transformer_lens_generation import dola_generate, run_generation_lens  # noqa: E402
from lens_plugins.adapters.patchscope_transformer_lens import patchscope  # noqa: E402 - it builds on this module
