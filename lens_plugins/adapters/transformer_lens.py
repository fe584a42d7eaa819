"""The logit lens on TransformerLens activation caches (``TransformerBridge`` and ``HookedTransformer``).

``import lens_plugins`` registers ``ActivationCache.lens``, so that after
``logits, cache = model.run_with_cache(prompt, names_filter=hook_filter())`` a notebook can ask
``cache.lens.logit_lens()``. The rows are TransformerLens's accumulated residual stream:
``blocks.0.hook_resid_pre`` ("embed"), optionally each ``hook_resid_mid`` ("3_mid"), each later
``hook_resid_pre`` ("3_pre"), and the last block's ``hook_resid_post`` ("29_post"), which the model
itself decodes, so the last row reproduces the model's own log-probabilities.
"""

from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins import tokens as token_utils
from lens_plugins.decoder import Decoder
from lens_plugins.logit_lens import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK, TokenSets, logit_lens_from_stack
from lens_plugins.prompt import DEFAULT_LENS_REDUCTIONS
from lens_plugins.norms import hf_norm_params
from lens_plugins.result import LensResult
from lens_plugins.typecheck import typechecked

_NORMALIZATION_KINDS = {"LN": "layernorm", "LNPre": "layernorm", "RMS": "rmsnorm", "RMSPre": "rmsnorm", None: "none"}


def hook_filter(model=None, resid_mid: bool = False) -> Union[list[str], Callable[[str], bool]]:
    """What ``run_with_cache(names_filter=...)`` must keep for the lens, and nothing else.

    With a model, the exact hook names; without one, a predicate (it keeps every ``hook_resid_post``,
    since it cannot know which block is last).
    """
    if model is not None:
        return ["hook_embed", *residual_hooks(model.cfg.n_layers, resid_mid)]
    suffixes = ("hook_resid_pre", "hook_resid_post") + (("hook_resid_mid",) if resid_mid else ())
    return lambda name: name == "hook_embed" or name.endswith(suffixes)


def residual_hooks(n_layers: int, resid_mid: bool = False) -> list[str]:
    """Hook names of the lens rows, in stream order."""
    names = []
    for layer in range(n_layers):
        names.append(f"blocks.{layer}.hook_resid_pre")
        if resid_mid:
            names.append(f"blocks.{layer}.hook_resid_mid")
    names.append(f"blocks.{n_layers - 1}.hook_resid_post")
    return names


def row_label(hook: str) -> str:
    """``blocks.0.hook_resid_pre`` -> "embed", ``blocks.3.hook_resid_mid`` -> "3_mid", ..."""
    _, layer, kind = hook.split(".")
    if layer == "0" and kind == "hook_resid_pre":
        return "embed"
    return f"{layer}_{kind.removeprefix('hook_resid_')}"


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
        kind, weight, bias, eps = hf_norm_params(original)
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


def residual_stack(cache, resid_mid: bool = False) -> tuple[Float[Tensor, "row batch seq d_model"], list[str]]:
    """The lens rows from a cache, with a fix-it message for each hook the cache lacks."""
    n_layers = cache.model.cfg.n_layers
    hooks = residual_hooks(n_layers, resid_mid)
    missing = [h for h in hooks if h not in cache.cache_dict]
    if missing:
        raise KeyError(
            f"the cache has no {missing[0]!r}" + (f" (and {len(missing) - 1} more lens hooks)" if len(missing) > 1 else "")
            + "; run model.run_with_cache(prompt, names_filter=lens_plugins.transformer_lens.hook_filter("
            + ("resid_mid=True" if resid_mid else "") + "))"
        )
    stack = torch.stack([cache[h] for h in hooks])
    if stack.dim() == 3:  # a cache taken with remove_batch_dim=True
        stack = stack.unsqueeze(1)
    return stack.detach(), [row_label(h) for h in hooks]


def recover_tokens(cache) -> Int[Tensor, "batch seq"]:
    """The prompt's token ids, read back from ``hook_embed`` (an exact row of ``W_E``, up to Gemma-style
    scaling), so that a cache alone is enough to know what was predicted where."""
    if "hook_embed" not in cache.cache_dict:
        raise KeyError(
            "the lens needs the prompt's tokens: pass tokens=model.to_tokens(prompt), or cache 'hook_embed' "
            "(lens_plugins.transformer_lens.hook_filter() includes it)"
        )
    embed = cache["hook_embed"].detach().float()
    if embed.dim() == 2:
        embed = embed.unsqueeze(0)
    W_E = cache.model.W_E.detach().float()
    unit = W_E / W_E.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    ids = (embed @ unit.T).argmax(-1)
    matched = W_E[ids]
    scale = (embed * matched).sum(-1, keepdim=True) / (matched * matched).sum(-1, keepdim=True).clamp(min=1e-12)
    error = (embed - scale * matched).norm(dim=-1) / embed.norm(dim=-1).clamp(min=1e-12)
    if error.max() > 1e-4:
        raise ValueError(
            "hook_embed is not a row of this model's W_E (relative error "
            f"{error.max().item():.2g}): the cache comes from a different model. Pass tokens= explicitly."
        )
    return ids


@typechecked
def logit_lens(
    cache,
    *,
    tokens: Optional[Int[Tensor, "batch seq"]] = None,
    resid_mid: bool = False,
    layers: Optional[Sequence[Union[int, str]]] = None,
    positions: Optional[Union[int, Sequence[int]]] = None,
    top_k: int = 5,
    targets: Sequence[token_utils.TargetSpec] = (),
    token_sets: Optional[TokenSets] = None,
    reductions: Sequence[str] = DEFAULT_LENS_REDUCTIONS,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
) -> LensResult:
    """The logit lens of a TransformerLens ``ActivationCache`` (the function behind ``cache.lens.logit_lens``).

    ``tokens`` defaults to the ids recovered from ``hook_embed``; ``layers`` picks rows by index or label
    (the final row is always kept as the reference); ``positions`` (prompt indices, negative
    allowed) defaults to all; ``targets`` are single-token strings or ids whose log-prob and rank are
    reported at every row and position; ``token_sets`` maps names to several tokens whose probabilities
    add up; ``reductions`` names what to compute (``lens_plugins.prompt.LENS_REDUCTIONS``).
    """
    model = getattr(cache, "model", None)
    if model is None:
        raise ValueError("this ActivationCache has no model attached; build it with model.run_with_cache(...)")
    if getattr(model, "training", False):
        raise ValueError("the model is in training mode (dropout on), so its cache is not its prediction: call model.eval()")
    stack, labels = residual_stack(cache, resid_mid)
    if tokens is None:
        tokens = recover_tokens(cache)
    if tuple(tokens.shape) != tuple(stack.shape[1:3]):
        raise ValueError(f"tokens have shape {tuple(tokens.shape)} but the cache holds [batch, seq] = {tuple(stack.shape[1:3])}")
    return logit_lens_from_stack(
        stack, labels, decoder_for(model), tokens.to(torch.long).cpu(), model.tokenizer,
        layers=layers, positions=positions, top_k=top_k, targets=targets, token_sets=token_sets,
        reductions=reductions, vocab_chunk=vocab_chunk, token_chunk=token_chunk,
    )


def run_logit_lens(model, prompt: Union[str, list[str]], *, resid_mid: bool = False, **kwargs) -> LensResult:
    """Run ``model`` on ``prompt`` caching only the lens hooks, then decode: the one-call form."""
    if isinstance(prompt, str) and prompt.strip() == "" or isinstance(prompt, list) and not prompt:
        raise ValueError(f"the prompt is empty ({prompt!r}): give the model some text to predict from")
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook_filter(model, resid_mid))
    return logit_lens(cache, tokens=tokens, resid_mid=resid_mid, **kwargs)


class CacheLens:
    """The ``cache.lens`` accessor: lens operations bound to one ``ActivationCache``."""

    def __init__(self, cache):
        self._cache = cache

    def logit_lens(self, **kwargs) -> LensResult:
        return logit_lens(self._cache, **kwargs)

    def decoder(self) -> Decoder:
        return decoder_for(self._cache.model)

    def stack(self, resid_mid: bool = False) -> tuple[Tensor, list[str]]:
        return residual_stack(self._cache, resid_mid)


class _Accessor:
    """A descriptor like pandas' accessors: ``cache.lens`` builds a ``CacheLens`` on access."""

    def __get__(self, cache, owner=None):
        if cache is None:
            return CacheLens
        return CacheLens(cache)


def register_accessor(cache_class) -> None:
    if not isinstance(cache_class.__dict__.get("lens"), _Accessor):
        cache_class.lens = _Accessor()
