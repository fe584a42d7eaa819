"""DoLa, decoding by contrasting layers (Chuang et al. 2023), as plain torch: one decoding step.

At each step the last position is decoded at a set of candidate "premature" layers and at the final
("mature") layer. The premature layer is the candidate whose distribution is furthest from the mature one
in Jensen-Shannon divergence, measured by the streamed readout (``js_final``, the true JS divergence, in
nats). Tokens are scored ``log p_mature - log p_premature`` over the adaptive plausibility set
``{v : p_mature(v) >= alpha * max p_mature}``, every other token ``-inf``; the optional repetition penalty
(Keskar et al. 2019, as transformers applies it to DoLa's scores) divides a positive score of an already
seen token by the penalty and multiplies a negative one by it. The step's token is the best score.

Two choices of ours, both documented in the README:

- Ties in the contrast are broken by the mature log-prob. They are exact only when the premature layer is
  the mature layer itself (every plausible score is 0), so a candidate set of just the final layer is
  greedy decoding, instead of "the lowest token id among the plausible ones".
- ``premature_norm=True`` (default) decodes premature layers through the final norm, as the logit lens
  does, and picks the layer by the true JS divergence; ``False`` is transformers 4.x's
  ``generate(dola_layers=...)`` step for step (``lm_head`` on raw hidden states, its own layer criterion,
  ``transformers_criterion``, and a plain argmax), for a like-for-like comparison.

Layers are Hugging Face ``output_hidden_states`` indices: 0 is the embeddings, ``i`` the input of block
``i``, ``n_layers`` the final residual (``rows`` maps them to ``Row``s). Like every module of
``lens_plugins.core`` this imports only torch and core, carries no decorators and takes everything as
arguments. The in-trace loop over a ``model.generate`` is ``core.trace.dola``.
"""

import math
from dataclasses import replace

import torch

from lens_plugins.core import readout
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.rows import plan

FORMAT = "lens_plugins.dola/1"  # marks a DoLa record (either backend's), so the local side can refuse anything else


def candidate_layers(layers, n_layers, tied_embeddings):
    """Hidden-state indices of the premature candidates: a list of ints (``n_layers`` allowed: the final
    layer, which makes DoLa greedy), or transformers 4.x's ``"low"`` / ``"high"`` buckets (every second
    layer of the lower / upper half; the 20 lowest / highest layers above 40 layers; the embeddings skipped
    for tied embeddings, where they would decode to the input token)."""
    if isinstance(layers, str):
        if layers not in ("low", "high"):
            raise LensValueError(f"layers={layers!r}: pass 'low', 'high' or a list of hidden-state indices")
        if not tied_embeddings:
            start = 0
        else:
            start = 2 if n_layers > 2 else (1 if n_layers == 2 else 0)
        if layers == "low":
            chosen = [start] if start == n_layers // 2 else list(range(start, n_layers // 2 if n_layers <= 40 else 20, 2))
        else:
            chosen = list(range(n_layers // 2 if n_layers <= 40 else n_layers - 20, n_layers, 2))
        if not chosen:
            raise LensValueError(f"layers={layers!r} names no layer of a {n_layers}-layer model with "
                             f"tie_word_embeddings={tied_embeddings}; pass hidden-state indices instead")
        return chosen
    chosen = [int(layer) for layer in layers]
    if not chosen:
        raise LensValueError("layers is empty: name at least one premature candidate")
    bad = [layer for layer in chosen if not 0 <= layer <= n_layers]
    if bad:
        raise LensValueError(f"layers {bad} are not hidden-state indices of a {n_layers}-layer model "
                         f"(0 = embeddings .. {n_layers} = final residual)")
    return list(dict.fromkeys(chosen))


def rows(layers, n_layers):
    """The ``Row`` of each hidden-state index (0: ``embed``, ``i < n_layers``: ``i_pre``, ``n_layers``: the last
    block's ``post``), so either backend's reader reads the candidates."""
    every = plan(n_layers)  # hidden-state index i is the default plan's row i
    return [every[layer] for layer in layers]


def contrast(mature_logits, premature_logits, alpha):
    """DoLa's scores ``[..., vocab]``: ``log p_mature - log p_premature`` on the plausible set, ``-inf``
    elsewhere (the mature top-1 is always plausible)."""
    if not 0.0 < alpha <= 1.0:
        raise LensValueError(f"alpha must be in (0, 1], got {alpha}")
    mature = torch.log_softmax(mature_logits.float(), -1)
    premature = torch.log_softmax(premature_logits.float(), -1)
    plausible = mature >= mature.amax(-1, keepdim=True) + math.log(alpha)
    return torch.where(plausible, mature - premature, torch.full_like(mature, float("-inf")))


def check_options(alpha, penalty):
    """Refuse, before the first forward pass, an ``alpha`` outside (0, 1] or a repetition penalty that is not a
    positive finite number (NaN included: it would turn every seen token's score into NaN)."""
    if not 0.0 < alpha <= 1.0:
        raise LensValueError(f"alpha must be in (0, 1], got {alpha}")
    if penalty is not None and not 0 < penalty < math.inf:  # NaN fails both comparisons
        raise LensValueError(f"repetition_penalty must be a positive finite number (1.0 is none), got {penalty}")


def penalise(scores, seen_ids, penalty):
    """The repetition penalty on the scores of ``seen_ids`` (prompt and generated so far)."""
    if penalty is None:
        return scores
    ids = torch.as_tensor(seen_ids, dtype=torch.long, device=scores.device).unique()
    seen = scores[ids]
    scores = scores.clone()
    scores[ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores


def pick(scores, mature_logprobs):
    """The best score's token, ties broken by the mature log-prob."""
    tied = scores == scores.max()
    return int(torch.where(tied, mature_logprobs, torch.full_like(mature_logprobs, float("-inf"))).argmax())


def transformers_criterion(mature_logits, premature_logits):
    """transformers 4.x's layer criterion ``[C]``, reproduced operation for operation (``_dola_select_contrast``):
    with ``m = (p_mature + p_premature) / 2``, ``0.5 * (kl_div(log p_mature, m) + kl_div(log p_premature, m))``
    averaged over the vocabulary. ``kl_div(log p, m)`` is KL(m || p), so this is not the Jensen-Shannon
    divergence (which is bounded by ln 2 and, on raw residuals, sits at ln 2 for every candidate to within 1e-7,
    leaving the choice to float rounding); it keeps growing, so the layer it picks is well defined."""
    functional = torch.nn.functional
    mature = mature_logits.float()[None, None]  # [1, batch 1, vocab], as transformers stacks it
    premature = premature_logits.float()[:, None]  # [C, batch 1, vocab]
    average = 0.5 * (functional.softmax(mature, dim=-1) + functional.softmax(premature, dim=-1))
    kl_mature = functional.kl_div(functional.log_softmax(mature, dim=-1), average, reduction="none").mean(-1)
    kl_premature = functional.kl_div(functional.log_softmax(premature, dim=-1), average, reduction="none").mean(-1)
    return (0.5 * (kl_mature + kl_premature)).mean(-1)


def dola_step(candidates, mature, layers, n_layers, decoder, alpha, seen_ids, repetition_penalty, premature_norm):
    """One DoLa step at one position.

    ``candidates [C, d_model]`` are the residuals at hidden-state indices ``layers`` and ``mature [d_model]``
    the final residual (before the final norm); ``decoder`` is a ``readout.DecoderTensors``. Returns the
    chosen ``token``, the premature ``layer`` (a hidden-state index), the candidates' ``js`` divergences
    ``[C]`` from the mature distribution (the criterion the layer was chosen by: the true Jensen-Shannon
    divergence, or transformers' with ``premature_norm=False``) and the step's ``scores [vocab]`` (after any
    penalty).

    ``premature_norm=False`` is transformers 4.x's DoLa, step for step: premature logits are ``lm_head`` of the
    raw hidden states (index ``n_layers``, which Hugging Face returns after the final norm, normed; no
    soft-cap, which Gemma applies outside ``lm_head``), the mature logits the model's own, the layer chosen by
    ``transformers_criterion`` and the token by a plain argmax (the lowest id on a tie).
    """
    device = decoder.W_U.device
    mature = mature.to(device).float()
    candidates = candidates.to(device).float()
    if premature_norm:
        stats = readout.lens_statistics(
            torch.cat([candidates, mature[None]])[:, None], decoder, top_k=1,
            target_ids=torch.zeros(1, 0, dtype=torch.long, device=device), reductions=("js_final",),
        )
        js = stats["js_final"][:-1, 0]
        chosen = int(js.argmax())
        logits = decoder.unembed(decoder.normalize(torch.stack([mature, candidates[chosen]])))
        mature_logits, premature_logits = logits[0], logits[1]
    else:
        normed_final = decoder.normalize(mature)
        raw = torch.stack([normed_final if layer == n_layers else row for layer, row in zip(layers, candidates)])
        head = replace(decoder.without_norm(), softcap=None)  # transformers' lm_head alone
        premature_all = head.unembed(raw)
        mature_logits = decoder.unembed(normed_final)
        js = transformers_criterion(mature_logits, premature_all)
        chosen = int(js.argmax())
        premature_logits = premature_all[chosen]
    scores = penalise(contrast(mature_logits, premature_logits, alpha), seen_ids, repetition_penalty)
    token = pick(scores, torch.log_softmax(mature_logits, -1)) if premature_norm else int(scores.argmax())
    return {"token": token, "layer": layers[chosen], "js": js.cpu(), "scores": scores.cpu()}

__all__ = ["FORMAT", "candidate_layers", "rows", "contrast", "check_options", "penalise", "pick", "transformers_criterion",
           "dola_step"]
