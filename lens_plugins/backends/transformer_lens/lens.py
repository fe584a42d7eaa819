"""The logit lens on TransformerLens activation caches (``TransformerBridge`` and ``HookedTransformer``):
``logit_lens(cache)`` (also ``cache.lens.logit_lens()``) and the one-call ``run_logit_lens(model, prompt)``.
Rows are read by ``reader``; request, checks and readout are the shared pipeline's (``methods.lens``)."""

from collections.abc import Sequence
from typing import Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor

from lens_plugins import tokens as token_utils
from lens_plugins.backends._common import Prompt, check_context, context_length, eval_mode, one_at_a_time
from lens_plugins.backends.transformer_lens.reader import (
    Sublayers,
    check_tokens_match_embed,
    hook_filter,
    lens_rows,
    recover_tokens,
    prompt_inputs,
)
from lens_plugins.backends.transformer_lens.verification import decoder_for
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.reductions import DEFAULT_LENS as DEFAULT_LENS_REDUCTIONS
from lens_plugins.methods.lens import DEFAULT_TOKEN_CHUNK, DEFAULT_TOP_K, DEFAULT_VOCAB_CHUNK, TokenSets, run_lens
from lens_plugins.methods.result import LensResult
from lens_plugins.typecheck import typechecked


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
    auto_tokens: int = 0,
) -> LensResult:
    """The logit lens of a TransformerLens ``ActivationCache`` (the function behind ``cache.lens.logit_lens``).

    ``tokens`` defaults to the ids recovered from ``hook_embed``; ``attention_mask`` (1 on real tokens, as
    passed to ``run_with_cache`` for a padded batch) marks padding, which scores nothing and is left out of
    every average; ``resid_mid`` / ``sublayers`` choose the rows (module docstring) and ``layers`` selects
    among them by index or label (the final row is always kept as the reference); ``positions`` (prompt
    indices, negative allowed) defaults to all; ``targets`` are single-token strings or ids whose log-prob
    and rank are reported at every row and position; ``token_sets`` maps names to several tokens whose
    probabilities add up; ``reductions`` names what to compute (``lens_plugins.core.reductions.LENS``);
    ``lens`` maps each row before decoding (``lens_plugins.lenses``; default the logit lens); ``auto_tokens=N``
    traces, per position, the N tokens most worth tracking (``core.track``; ``LensResult.tracked``).

    Args:
        cache: an ``ActivationCache`` of a ``TransformerBridge`` or ``HookedTransformer``, cached with
            ``names_filter=lp.transformer_lens.hook_filter(model, ...)``.
        tokens: the ids that ran (``[batch, seq]``); default recovered from ``hook_embed``.
        attention_mask: 1 on real tokens, for a padded batch.
        resid_mid: also decode each block's ``hook_resid_mid``.
        sublayers: decode after every attention and MLP sublayer (``True``) or their outputs (``"outputs"``).
        layers: rows to keep, by index or label (``[0, "12_pre", -1]``); the final row is always kept as the reference.
        positions: prompt positions to decode (negative allowed); default all.
        top_k: tokens kept per row and position (the ``top_k`` reduction).
        targets: single-token strings (mind the leading space) or ids whose rank and log-prob are reported.
        token_sets: ``{name: [tokens]}``: several tokens whose probabilities add up (a set ranks as its best member).
        reductions: what to compute, by name (``lens_plugins.core.reductions.LENS``); default top-k, entropy, both
            KLs to the final row, the final top-1 and the next token.
        lens: a map applied to each row before the final norm (``lp.TunedLens``, ``lp.AffineLens``, ...); default
            the logit lens.
        vocab_chunk: vocabulary columns per tile (default: chosen by ``readout.tile_sizes``); results do not
            depend on it beyond float32 rounding.
        token_chunk: row x token vectors per tile (as ``vocab_chunk``).
        precision: ``"float32"`` (default), ``"tf32"`` (CUDA only) or ``"bf16x3"``; statistics are float32 in
            every mode.

    Returns:
        A ``LensResult``: statistics ``[row, batch, pos, ...]`` in float32, with row labels and token strings.

    Raises:
        LensKeyError: the cache lacks a hook the rows need (the message names the ``hook_filter`` to cache with).
        LensValueError: a bad target, position, reduction or lens, a prompt longer than the context, non-finite
            residuals, or a model in training mode.
    """
    model, every, read, (batch, seq) = lens_rows(cache, resid_mid, sublayers)
    decoder = decoder_for(model, sublayers=bool(resid_mid or sublayers))  # verified first: refused before any check
    check_context(seq, context_length(model))
    if tokens is None:
        tokens = recover_tokens(cache)
    if tuple(tokens.shape) != (batch, seq):
        raise LensValueError(f"tokens have shape {tuple(tokens.shape)} but the cache holds [batch, seq] = {(batch, seq)}")
    check_tokens_match_embed(cache, tokens, attention_mask)
    if getattr(lens, "raw_basis", False):  # a lens fitted on raw activations (the Jacobian lens)
        from lens_plugins.backends.transformer_lens.jacobian import check_raw

        check_raw(model)
    return run_lens(
        read, every, layers, tokens.to(torch.long).cpu(), model.tokenizer, decoder,
        attention_mask=None if attention_mask is None else attention_mask.to(torch.long).cpu(),
        positions=positions, top_k=top_k, targets=targets, token_sets=token_sets, reductions=reductions,
        lens=lens, vocab_chunk=vocab_chunk, token_chunk=token_chunk, precision=precision, auto_tokens=auto_tokens,
    )


@one_at_a_time
@typechecked
def run_logit_lens(
    model,
    prompt: Prompt,
    *,
    resid_mid: bool = False,
    sublayers: Sublayers = False,
    padding_side: Optional[str] = None,
    prepend_bos: Optional[bool] = None,
    **kwargs,
) -> LensResult:
    """Run ``model`` on ``prompt`` caching only the lens hooks, then decode: the one-call form.

    A batch of prompts is padded on ``padding_side`` ("left" or "right"; default the tokenizer's) and run
    with its attention mask, so each prompt's lens is its lens alone; ``result.attention_mask`` marks the
    padding. ``prepend_bos`` (``None``: as the model's own Hugging Face tokenizer does, which is what nnsight
    runs; ``True``: exactly one BOS; ``False``: none) is the one tokenization rule of both backends
    (``backends._common.prompt_ids``), not TransformerLens's ``to_tokens``. A prompt longer than the model's
    context is refused (``to_tokens`` would truncate it). A model in training mode runs in eval mode for the
    call, with a warning, and is put back.

    Args:
        model: a ``TransformerBridge`` (TransformerLens 4.x) or ``HookedTransformer`` (3.9).
        prompt: a text or a list of texts (a padded batch), or model inputs (a processor's output: ``input_ids``, ``pixel_values`` ...).
        resid_mid: also decode each block's ``hook_resid_mid``.
        sublayers: decode after every attention and MLP sublayer (``True``) or their outputs (``"outputs"``).
        padding_side: ``"left"`` or ``"right"`` for a batch; default the tokenizer's.
        prepend_bos: ``None`` (as the tokenizer does), ``True`` (exactly one BOS) or ``False`` (none).
        **kwargs: every option of ``logit_lens`` (``top_k``, ``targets``, ``token_sets``, ``layers``,
            ``positions``, ``reductions``, ``lens``, ``precision``, ...).

    Returns:
        The ``LensResult`` of ``logit_lens`` on the cached run.

    Raises:
        LensValueError: an empty prompt, a prompt longer than the model's context, or a bad option of
            ``logit_lens``.
    """
    tokens, mask, extra = prompt_inputs(model, prompt, padding_side, prepend_bos)
    with eval_mode(model), torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, **extra,
                                        names_filter=hook_filter(model, resid_mid, sublayers))
        return logit_lens(cache, tokens=tokens, attention_mask=mask, resid_mid=resid_mid, sublayers=sublayers,
                          **kwargs)

__all__ = ["logit_lens", "run_logit_lens"]
