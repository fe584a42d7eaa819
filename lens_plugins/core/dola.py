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
  does; ``False`` skips it, as transformers 4.x ``generate(dola_layers=...)`` did (it applied ``lm_head``
  to raw hidden states), for a like-for-like comparison.

Layers are Hugging Face ``output_hidden_states`` indices: 0 is the embeddings, ``i`` the input of block
``i``, ``n_layers`` the final residual (``rows`` maps them to ``Row``s). Like every module of
``lens_plugins.core`` this imports only torch and core, carries no decorators and takes everything as
arguments. The in-trace loop over a ``model.generate`` is ``core.dola_trace``.
"""

import math

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


def penalise(scores, seen_ids, penalty):
    """The repetition penalty on the scores of ``seen_ids`` (prompt and generated so far)."""
    if penalty is None:
        return scores
    if penalty <= 0:
        raise LensValueError(f"repetition_penalty must be positive, got {penalty}")
    ids = torch.as_tensor(seen_ids, dtype=torch.long, device=scores.device).unique()
    seen = scores[ids]
    scores = scores.clone()
    scores[ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores


def pick(scores, mature_logprobs):
    """The best score's token, ties broken by the mature log-prob."""
    tied = scores == scores.max()
    return int(torch.where(tied, mature_logprobs, torch.full_like(mature_logprobs, float("-inf"))).argmax())


def dola_step(candidates, mature, layers, n_layers, decoder, alpha, seen_ids, repetition_penalty, premature_norm):
    """One DoLa step at one position.

    ``candidates [C, d_model]`` are the residuals at hidden-state indices ``layers`` and ``mature [d_model]``
    the final residual (before the final norm); ``decoder`` is a ``readout.DecoderTensors``. Returns the
    chosen ``token``, the premature ``layer`` (a hidden-state index), the candidates' ``js`` divergences
    ``[C]`` from the mature distribution and the step's ``scores [vocab]`` (after any penalty).
    """
    device = decoder.W_U.device
    mature = mature.to(device).float()
    candidates = candidates.to(device).float()
    if premature_norm:
        rows, lens_decoder = torch.cat([candidates, mature[None]]), decoder
    else:
        # Premature rows as transformers 4.x read them: raw hidden states, except index n_layers, which
        # Hugging Face returns after the final norm. Everything is then decoded without a norm.
        normed_final = decoder.normalize(mature)
        raw = [normed_final if layer == n_layers else row for layer, row in zip(layers, candidates)]
        rows = torch.stack(raw + [normed_final])
        lens_decoder = decoder.without_norm()
    stats = readout.lens_statistics(
        rows[:, None], lens_decoder, top_k=1, target_ids=torch.zeros(1, 0, dtype=torch.long, device=device),
        reductions=("js_final",),
    )
    js = stats["js_final"][:-1, 0]
    chosen = int(js.argmax())
    pair = torch.stack([rows[-1], rows[chosen]])
    if premature_norm:
        pair = decoder.normalize(pair)
    logits = lens_decoder.unembed(pair)
    scores = penalise(contrast(logits[0], logits[1], alpha), seen_ids, repetition_penalty)
    token = pick(scores, torch.log_softmax(logits[0], -1))
    return {"token": token, "layer": layers[chosen], "js": js.cpu(), "scores": scores.cpu()}

__all__ = ["FORMAT", "candidate_layers", "rows", "contrast", "penalise", "pick", "dola_step"]
