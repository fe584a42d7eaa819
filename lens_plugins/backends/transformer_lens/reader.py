"""TransformerLens's reader: rows of an ``ActivationCache`` (row -> hook name), its decoder, and the
one-call forms' tokenisation; every TransformerLens verb reads the model through here.

The rows are TransformerLens's accumulated residual stream: ``blocks.0.hook_resid_pre`` ("embed"),
optionally each ``hook_resid_mid`` ("3_mid"), each later ``hook_resid_pre`` ("3_pre"), and the last block's
``hook_resid_post`` ("29_post"), which the model itself decodes, so the last row reproduces the model's own
log-probabilities. ``sublayers=True`` has a row after every sublayer instead ("embed", "0_attn", "0_mlp",
...: ``hook_resid_mid`` and ``hook_resid_post``); a parallel-block model (GPT-J, NeoX) has no residual
between its attention and MLP, so its rows are "0_attn+mlp", ... ``sublayers="outputs"`` decodes each
sublayer's own write alone ("0_attn_out", "0_mlp_out", ..., nostalgebraist's sub-block view), with the
final residual kept as the last row.
"""

import weakref
from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins.backends._common import (
    check_context,
    check_one_prompt_ids,
    check_prompts,
    context_length,
    pad_prompts,
    processor_inputs,
    prompt_ids,
)
from lens_plugins.core.architectures import norm_params
from lens_plugins.core.verification import EPS_FIELDS
from lens_plugins.core.errors import LensKeyError, LensTypeError, LensValueError
from lens_plugins.core.rows import Row, plan
from lens_plugins.decoder import Decoder

_NORMALIZATION_KINDS = {"LN": "layernorm", "LNPre": "layernorm", "RMS": "rmsnorm", "RMSPre": "rmsnorm", None: "none"}


Sublayers = Union[bool, str]  # False, True (residual after each sublayer) or "outputs" (each write alone)


ATTRIBUTION_SUFFIXES = ("hook_attn_out", "hook_mlp_out", "attn.hook_z", "mlp.hook_post")


def hook_filter(
    model=None, resid_mid: bool = False, sublayers: Sublayers = False, attribution: bool = False
) -> Union[list[str], Callable[[str], bool]]:
    """What ``run_with_cache(names_filter=...)`` must keep for the lens, and nothing else.

    With a model, the exact hook names; without one, a predicate (it keeps every ``hook_resid_post``,
    since it cannot know which block is last). ``resid_mid`` / ``sublayers`` add what ``logit_lens`` reads
    with those rows, ``attribution`` what ``attribution`` reads (each layer's attention and MLP writes,
    ``hook_z``, positional embeddings).

    Args:
        model: the model the cache will come from; ``None`` gives a predicate on hook names instead of a list.
        resid_mid: also cache ``hook_resid_mid``.
        sublayers: also cache each attention and MLP output (``True`` or ``"outputs"``).
        attribution: also cache what direct logit attribution reads (sublayer outputs, ``attn.hook_z``).

    Returns:
        The hook names to pass as ``run_with_cache(..., names_filter=...)`` (a predicate when ``model`` is None).
    """
    if model is not None:
        names = ["hook_embed"]
        names += [hook_name(row) for row in plan(model.cfg.n_layers, False, False, is_parallel(model))]
        if resid_mid or sublayers:
            names += [hook_name(row) for row in plan(model.cfg.n_layers, resid_mid, sublayers, is_parallel(model))]
        if attribution:
            names += attribution_hooks(model)
            names += [f"blocks.{layer}.mlp.hook_post" for layer in range(model.cfg.n_layers)]  # by="neuron"
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


def build_decoder(model, norm: Optional[dict] = None) -> Decoder:
    """The decoder of a ``HookedTransformer`` or ``TransformerBridge``, in raw or compatibility mode, as
    read off the model (unchecked: ``verification.decoder_for`` is what the verbs call).

    Norm parameters are read from the live ``ln_final`` (folded models carry none), so a bridge whose
    layer norms were folded into ``W_U`` decodes through the folded weights exactly as the model does.
    ``norm`` (``{"norm_kind", "norm_one_plus", "norm_eps"}``, fitted by the verification) overrides what the
    norm's class name says, for a bridge norm whose convention the name does not tell (VaultGemma's ``1 + w``).
    """
    cfg = model.cfg
    normalization = getattr(cfg, "normalization_type", None)
    if normalization not in _NORMALIZATION_KINDS:
        raise LensValueError(f"unsupported normalization_type {normalization!r}; expected one of {list(_NORMALIZATION_KINDS)}")
    kind = _NORMALIZATION_KINDS[normalization]
    head = (getattr(getattr(model, "adapter", None), "component_mapping", None) or {}).get("mlm_head")
    if head is not None:  # BERT, RoBERTa: dense and activation before ln_final, which W_U alone skips
        raise LensValueError(
            f"this bridge's model decodes through a prediction head ({getattr(head, 'name', 'mlm_head')!r}: a dense "
            "layer and an activation before the final norm) that the lens's decoder (final norm, W_U) does not "
            "apply, so its rows cannot be lensed as they are (the nnsight backend refuses the family too)")
    weight = bias = None
    eps = float(getattr(cfg, "eps", 1e-5))
    ln_final = getattr(model, "ln_final", None)
    original = getattr(ln_final, "_original_component", None)
    if original is not None:  # TransformerBridge: the wrapped Hugging Face norm
        # the fitted convention is the class's; the eps is this model's own where its norm holds one
        own_eps = next((getattr(original, f) for f in EPS_FIELDS if isinstance(getattr(original, f, None), float)), None)
        fitted = {} if norm is None else {"kind": norm["norm_kind"], "one_plus": norm["norm_one_plus"],
                                          "eps": norm["norm_eps"] if own_eps is None else own_eps}
        kind, weight, bias, eps = detached(norm_params(original, **fitted))
    elif ln_final is not None and normalization in ("LN", "RMS"):  # HookedTransformer LayerNorm / RMSNorm
        weight = ln_final.w.detach()
        bias = getattr(ln_final, "b", None)
        bias = None if bias is None else bias.detach()
    softcap = getattr(cfg, "output_logits_soft_cap", None)
    b_U = getattr(model, "b_U", None)
    W_U, b_U = model.W_U.detach(), None if b_U is None else b_U.detach()
    scale = output_scale(model)
    if scale != 1.0:  # the forward scales the logits after the unembedding: folded in, as on nnsight
        W_U, b_U = W_U * scale, None if b_U is None else b_U * scale
    return Decoder(
        norm_kind=kind,
        W_U=W_U,
        norm_weight=weight,
        norm_bias=bias,
        norm_eps=eps,
        b_U=b_U,
        softcap=float(softcap) if softcap is not None and softcap > 0 else None,
    )


def output_scale(model) -> float:
    """The factor a ``TransformerBridge``'s forward multiplies its logits by after the unembedding (Cohere's
    ``logit_scale``, Granite's ``1 / logits_scaling``, Falcon-H1's ``lm_head_multiplier``), read from the
    adapter's own ``apply_output_logits_transform`` on small logits (where a soft-cap is the identity);
    1.0 for a model without one. A transform that is not a scaling is refused: the decoder cannot reproduce
    it."""
    transform = getattr(getattr(model, "adapter", None), "apply_output_logits_transform", None)
    if not callable(transform):
        return 1.0
    probe = torch.tensor([1e-4, -2e-4, 3e-4])
    with torch.no_grad():
        out = transform(probe.clone()).float()
    scale = float(out[0] / probe[0])
    if not torch.allclose(out, probe * scale, rtol=1e-4, atol=0.0):
        raise LensValueError(f"this bridge's adapter ({type(model.adapter).__name__}) transforms the logits after the "
                             "unembedding in a way that is not a scaling, which the lens cannot reproduce; build the "
                             "decoder with lp.Decoder")
    return 1.0 if abs(scale - 1.0) <= 1e-6 else scale


def detached(params: tuple) -> tuple:
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
        require(cache, hooks, fix)
        stack = torch.stack([cache[h] if positions is None else cache[h][..., positions, :] for h in hooks])
        if stack.dim() == 3:  # a cache taken with remove_batch_dim=True
            stack = stack.unsqueeze(1)
        return stack.detach()

    return read


def fix_hint(resid_mid: bool, sublayers: Sublayers) -> str:
    return f"sublayers={sublayers!r}" if sublayers else ("resid_mid=True" if resid_mid else "")


def residual_stack(
    cache, resid_mid: bool = False, sublayers: Sublayers = False
) -> tuple[Float[Tensor, "row batch seq d_model"], list[str]]:
    """The lens rows from a cache, with a fix-it message for each hook the cache lacks."""
    rows = row_plan(cache, resid_mid, sublayers)
    return reader(cache, fix_hint(resid_mid, sublayers))(rows), [row.label for row in rows]


def require(cache, hooks: list[str], fix: str) -> None:
    """Name the first hook the cache lacks and the ``hook_filter`` call that caches it."""
    missing = [h for h in hooks if h not in cache.cache_dict]
    if missing:
        raise LensKeyError(
            f"the cache has no {missing[0]!r}" + (f" (and {len(missing) - 1} more hooks)" if len(missing) > 1 else "")
            + f"; run model.run_with_cache(prompt, names_filter=lens_plugins.transformer_lens.hook_filter({fix}))"
        )


def recover_tokens(cache) -> Int[Tensor, "batch seq"]:
    """The prompt's token ids, read back from ``hook_embed`` (an exact row of ``W_E``, up to Gemma-style
    scaling), so that a cache alone is enough to know what was predicted where."""
    if "hook_embed" not in cache.cache_dict:
        raise LensKeyError(
            "the lens needs the prompt's tokens: pass tokens=model.to_tokens(prompt), or cache 'hook_embed' "
            "(lens_plugins.transformer_lens.hook_filter() includes it)"
        )
    embed = _embed(cache)
    W_E = cache.model.W_E.detach().float()
    if embed.shape[-1] != W_E.shape[-1]:
        raise LensValueError(f"hook_embed has width {embed.shape[-1]} but this model's W_E has {W_E.shape[-1]}: "
                         "the cache comes from a different model")
    unit = W_E / W_E.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    # Nearest row a few hundred positions at a time: [tokens, vocab] scores for a long prompt would not fit.
    ids = torch.cat([(chunk @ unit.T).argmax(-1) for chunk in embed.split(256, dim=1)], dim=1)
    matched = W_E[ids]
    scale = (embed * matched).sum(-1, keepdim=True) / (matched * matched).sum(-1, keepdim=True).clamp(min=1e-12)
    error = (embed - scale * matched).norm(dim=-1) / embed.norm(dim=-1).clamp(min=1e-12)
    if error.max() > 1e-4:
        raise LensValueError(
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
        raise LensValueError(
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


def lens_rows(cache, resid_mid: bool, sublayers: Sublayers):
    """``(model, row plan, reader, (batch, seq))`` of a cache, refusing a cache that lacks a row's hook."""
    model = cache_model(cache)
    every = row_plan(cache, resid_mid, sublayers)
    fix = fix_hint(resid_mid, sublayers)
    require(cache, [hook_name(row) for row in every], fix)
    first = cache[hook_name(every[0])]
    shape = (1, first.shape[0]) if first.dim() == 2 else tuple(first.shape[:2])
    return model, every, reader(cache, fix), shape


def cache_model(cache):
    """The model a cache came from, refused in training mode (dropout: the cache is not its prediction)."""
    model = getattr(cache, "model", None)
    if model is None:
        raise LensValueError("this ActivationCache has no model attached; build it with model.run_with_cache(...)")
    if getattr(model, "training", False):
        raise LensValueError("the model is in training mode (dropout on), so its cache is not its prediction: call model.eval()")
    return model


def at(cache, hook: str, position: int) -> Tensor:
    """One hook's activation at ``position``, ``[batch, ...]``, for caches with or without a batch dim."""
    value = cache[hook].detach()
    if cache.has_batch_dim is False:
        value = value.unsqueeze(0)
    return value[:, position]


_OWN_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def hf_tokenizer(model):
    """The model's own Hugging Face tokenizer, whose ``tokenizer(text)`` is the default of ``prompt_ids``.
    TransformerLens swaps a tokenizer that adds no BOS for a copy reloaded with ``add_bos_token=True``
    (``get_tokenizer_with_bos``, so that ``to_tokens`` can strip it again); that copy is reloaded here as the
    tokenizer's own files define it, once per copy, so that a prompt is the same ids here as on nnsight, in
    ``model.generate`` and in pipelines. A tokenizer that adds no BOS is TransformerLens's unchanged original.
    What the files cannot say (a tokenizer given ``add_bos_token`` in memory) TransformerLens's copy hides:
    pass ``prepend_bos`` then."""
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "add_bos_token", False):
        return tokenizer
    own = _OWN_TOKENIZERS.get(tokenizer)
    if own is None:
        from transformers import AutoTokenizer

        kwargs = {k: v for k, v in tokenizer.init_kwargs.items() if k not in ("name_or_path", "add_bos_token")}
        try:
            own = AutoTokenizer.from_pretrained(tokenizer.name_or_path, **kwargs)
        except (OSError, ValueError) as error:
            raise LensValueError(
                f"cannot reload this model's own tokenizer from {tokenizer.name_or_path!r} ({error}) to tokenize "
                "as Hugging Face does (prepend_bos=None): pass prepend_bos=True or prepend_bos=False"
            ) from error
        _OWN_TOKENIZERS[tokenizer] = own
    return own


def tokenize(model, prompt: Union[str, list[str]], padding_side: Optional[str],
             prepend_bos: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """``(tokens, attention_mask)`` of the one-call forms: prompts checked, tokenized by ``prompt_ids`` (the
    rule nnsight's one-call forms use: BOS as the model's own tokenizer adds it unless ``prepend_bos`` says),
    never truncated (a prompt longer than the context is refused), a batch padded on ``padding_side``
    (default the tokenizer's)."""
    tokenizer = hf_tokenizer(model)
    sequences = [prompt_ids(tokenizer, p, prepend_bos) for p in check_prompts(prompt)]
    check_context(max(len(s) for s in sequences), context_length(model))
    tokens, mask = pad_prompts(model.tokenizer, sequences, padding_side or getattr(model.tokenizer, "padding_side", "right"))
    device = model.cfg.device
    return tokens.to(device), mask.to(device)


def prompt_inputs(model, prompt, padding_side: Optional[str],
                  prepend_bos: Optional[bool] = None) -> tuple[Tensor, Tensor, dict]:
    """``(tokens, attention_mask, other inputs)`` of a one-call form: text as ``tokenize`` does it (no other
    inputs); model inputs (a processor's output: ``input_ids``, ``attention_mask``, an image's ``pixel_values``
    ...) as given, checked by ``_common.processor_inputs``, the rest passed to ``run_with_cache`` by name."""
    inputs = processor_inputs(model, prompt)
    if inputs is None:
        return (*tokenize(model, prompt, padding_side, prepend_bos), {})
    device = model.cfg.device
    inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return inputs.pop("input_ids"), inputs.pop("attention_mask"), inputs


def prompt_tokens(model, text: Union[str, torch.Tensor], max_new_tokens: int,
                  prepend_bos: Optional[bool] = None) -> torch.Tensor:
    """One prompt, as text (tokenized by ``prompt_ids``) or as ``[1, seq]`` token ids (run as given), that
    fits the model's context with the ``max_new_tokens`` to be generated after it."""
    if isinstance(text, torch.Tensor):
        check_one_prompt_ids(model, text)
        tokens = text.long()
    elif not isinstance(text, str):
        raise LensTypeError("generation takes one prompt (a string or [1, seq] token ids); run a batch prompt by prompt")
    else:
        tokens, _ = tokenize(model, text, None, prepend_bos)
    check_context(tokens.shape[1], context_length(model), max_new_tokens)
    return tokens

__all__ = ["Sublayers", "ATTRIBUTION_SUFFIXES", "hook_filter", "is_parallel", "hook_name", "attribution_hooks",
    "has_pos_embed", "build_decoder", "output_scale", "detached", "row_plan", "reader", "fix_hint", "residual_stack", "require",
    "recover_tokens", "check_tokens_match_embed", "lens_rows", "cache_model", "at", "hf_tokenizer", "tokenize", "prompt_inputs", "prompt_tokens"]
