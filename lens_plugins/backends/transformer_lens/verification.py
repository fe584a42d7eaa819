"""A TransformerLens model checked against its own numbers before any lens reads it, once per model class.

``core.verification`` checks a Hugging Face model before the nnsight path lenses it; this is the same check
for the TransformerLens backend, where the rows are hook points a TransformerLens adapter placed. An adapter
can place them wrongly, or leave out a step the model takes before its unembedding, and then every number the
lens reports is wrong without any error (a ModernBERT decoder's prediction head, VaultGemma's ``1 + w`` final
norm read as ``w``). So on first use, ``decoder_for`` runs one forward of a few tokens and checks

- every residual row (``embed``, ``i_pre``) against the wrapped Hugging Face model's ``output_hidden_states``
  on the same tokens (a ``TransformerBridge``; a ``HookedTransformer`` has no second model to compare with);
  rows that differ only by what a LayerNorm removes (``center_writing_weights`` in compatibility mode) pass;
- the last row decoded by the decoder against the model's own logits, and against the wrapped model's logits
  up to a constant per position (``center_unembed`` shifts them by one);
- the sublayer hooks adding up block by block (input + attention write = ``hook_resid_mid``, + MLP write =
  output; parallel blocks: input + both writes = output);
- on the first direct logit attribution by head, the per-head writes summing to each attention write
  (``require_heads``, called by the attribution verb, which owns the split).

A model that fails the first two is refused (``UnknownArchitectureError`` naming the row and the size of the
mismatch); one whose final norm convention the norm's class name does not tell gets the convention fitted from
the recorded numbers (as ``core.verification`` does for a discovered family). Failing the sublayer or head
check refuses only sublayer rows (and ``resid_mid`` rows) or attribution, with the reason. Verdicts are kept
per (model class, adapter, wrapped model class, dtype, processing), as the nnsight path keeps them.
"""

import threading

import torch

from lens_plugins.backends._common import model_lock
from lens_plugins.backends.transformer_lens.reader import (
    build_decoder,
    hook_filter,
    is_parallel,
    residual_stack,
)
from lens_plugins.core import dla
from lens_plugins.core import verification as core_verification
from lens_plugins.core.errors import LensError, LensKeyError, UnknownArchitectureError
from lens_plugins.decoder import Decoder

VERDICTS = {}
_LOCK = threading.Lock()  # two threads' first calls on one class run one probe, not two


def decoder_for(model, sublayers: bool = False) -> Decoder:
    """The decoder of a ``HookedTransformer`` or ``TransformerBridge``, verified on first use (see the module
    docstring). ``sublayers=True`` (the verb reads sublayer or ``resid_mid`` rows, or attributes) also
    refuses a model whose sublayer hooks did not add up, with the reason."""
    verdict = verdict_of(model)
    if verdict["refused"]:
        raise UnknownArchitectureError(verdict["refused"])
    if sublayers:
        dla.check_sublayer_writes({"sublayers_refused": verdict["sublayers"]})
    return build_decoder(model, verdict["norm"])


def require_heads(model, split) -> None:
    """Refuse direct logit attribution by head when the per-head writes ``split(cache, position)`` (the
    attribution verb's ``cache_parts``) do not sum to the attention write on the probe; checked once."""
    verdict = verdict_of(model)
    with model_lock(model), _LOCK:
        if "heads" not in verdict:
            training = core_verification.eval_for_probe(model)
            try:
                verdict["heads"] = heads_problem(model, split)
            finally:
                core_verification.restore_modes(model, training)
    dla.check_supported({"heads_refused": verdict["heads"], "o_proj": True,
                         "sublayers_refused": verdict["sublayers"]})


def verdict_of(model) -> dict:
    """The model class's verdict, from ``VERDICTS`` or from a probe now. The probe holds the model's lock
    (the one every one-call verb holds: its hooks are the model's, so another thread's forward must not run
    beside it) and then ``_LOCK``, in that order everywhere."""
    key = verdict_key(model)
    if key in VERDICTS:
        return VERDICTS[key]
    with model_lock(model), _LOCK:
        if key not in VERDICTS:
            training = core_verification.eval_for_probe(model)
            try:
                VERDICTS[key] = verify(model)
            finally:
                core_verification.restore_modes(model, training)
        return VERDICTS[key]


def verdict_key(model) -> tuple:
    cfg = model.cfg
    parameter = next(model.parameters(), None)
    return (type(model), type(getattr(model, "adapter", None)), type(getattr(model, "original_model", None)),
            getattr(cfg, "original_architecture", None), getattr(cfg, "normalization_type", None),
            None if parameter is None else parameter.dtype, getattr(model, "compatibility_mode", None),
            getattr(model, "_weights_processed", None))


def probe_ids(model) -> torch.Tensor:
    """``TOKENS`` seeded token ids, above the ids tokenizers reserve for pad / bos / eos."""
    vocab = model.cfg.d_vocab
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(3, vocab - 1), vocab, (1, core_verification.TOKENS), generator=generator)
    return ids.to(model.cfg.device)


def probe(model, names):
    """The model's own logits and cache on the probe tokens, with only ``names`` kept."""
    with torch.no_grad():
        return model.run_with_cache(probe_ids(model), names_filter=names)


def probe_with_reference(model, names):
    """``(own logits, cache, (hidden states, logits) or None)``: the probe, with the wrapped Hugging Face
    model's own ``output_hidden_states`` and logits as the reference. A bridge runs the wrapped model inside
    its forward, so one forward gives both (its output caught by a hook); a forward that does not pass
    ``output_hidden_states`` on costs a second one; ``None`` for a model with no wrapped model, or one whose
    forward does not take token ids alone."""
    hf = getattr(model, "original_model", None)
    if not isinstance(hf, torch.nn.Module):
        return (*probe(model, names), None)
    caught = []
    handle = hf.register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        with torch.no_grad():
            own, cache = model.run_with_cache(probe_ids(model), names_filter=names, output_hidden_states=True)
    except TypeError:  # the bridge's forward does not take the argument: the probe alone, then the reference
        own, cache = probe(model, names)
    finally:
        handle.remove()
    if caught and getattr(caught[-1], "hidden_states", None) is not None:
        return own, cache, (caught[-1].hidden_states, getattr(caught[-1], "logits", None))
    try:
        with torch.no_grad():
            out = hf(input_ids=probe_ids(model), output_hidden_states=True, use_cache=False)
    except Exception:  # a wrapped model that needs more than token ids: the bridge's own numbers are the check
        return own, cache, None
    return own, cache, (getattr(out, "hidden_states", None), getattr(out, "logits", None))


def verify(model) -> dict:
    """``{"refused", "norm", "sublayers"}`` from one short forward: the reason the model is refused (or
    ``None``), a fitted final-norm convention (or ``None``), and why sublayer rows are refused (or ``None``)."""
    wrapped = getattr(model, "original_model", None)
    name = type(model if wrapped is None else wrapped).__name__
    verdict = {"refused": None, "norm": None, "sublayers": None}
    n = model.cfg.n_layers
    sublayer_names = hook_filter(None, sublayers="outputs")
    keep = set(hook_filter(model)) | {"ln_final.hook_in", "ln_final.hook_out"}
    try:
        own, cache, ref = probe_with_reference(model, lambda hook: hook in keep or sublayer_names(hook))
    except Exception as error:  # the model's forward did not fit the probe
        verdict["refused"] = (f"{name}: the verification forward failed ({type(error).__name__}: "
                              f"{str(error)[:300]})")
        return verdict
    try:
        stack, labels = residual_stack(cache)
    except LensKeyError as error:  # the adapter exposes no hook where the lens reads a row
        verdict["refused"] = (f"{name}: the model does not expose the residual rows the lens reads "
                              f"({str(error).split(';')[0]})")
        return verdict
    tol = core_verification.tolerance(model)
    hidden, logits = (None, None) if ref is None else ref
    try:
        decoder = build_decoder(model)
    except LensError as error:  # a decoder the backend cannot build (a prediction head before the norm)
        verdict["refused"] = f"{name}: {error}"
        return verdict
    problem = rows_problem(stack, labels, hidden, decoder, tol, n)
    if problem is None:
        problem = logits_problem(stack[-1], own, logits, decoder, tol, labels[-1])
        if problem is not None:
            fitted = fit_norm(model, cache, tol)
            if fitted is not None:
                refit = logits_problem(stack[-1], own, logits, build_decoder(model, fitted), tol, labels[-1])
                problem, verdict["norm"] = (None, fitted) if refit is None else (problem, None)
    if problem is not None:
        verdict["refused"] = (f"{name} cannot be lensed through this TransformerLens model as it is: {problem}. "
                              "Its rows or decoder, as the adapter exposes them, are not the model's own; build "
                              "the decoder with lp.Decoder, or lens the Hugging Face model with lp.nnsight")
        return verdict
    verdict["sublayers"] = sublayers_problem(cache, n, is_parallel(model), tol)
    return verdict


def rows_problem(stack, labels, hidden, decoder, tol, n):
    """The residual rows against ``output_hidden_states``: ``None`` or what did not match."""
    if hidden is None:
        return None
    if len(hidden) != n + 1:
        return f"the model has {n} blocks and its wrapped model returns {len(hidden)} hidden states"
    for i in range(n):
        error = core_verification.mismatch(stack[i], hidden[i])
        if error > tol and decoder.norm_kind == "layernorm":  # compatibility mode centres the residual
            with torch.no_grad():
                error = core_verification.mismatch(*(t - t.float().mean(-1, keepdim=True)
                                                     for t in (stack[i].float(), hidden[i].float())))
        if error > tol:
            return (f"row {labels[i]!r} differs from output_hidden_states[{i}] "
                    f"{core_verification.by(error, stack[i], hidden[i])}")
    return None


def logits_problem(last, own, logits, decoder, tol, label):
    """The last row decoded against the model's own logits and the wrapped model's (up to a constant per
    position): ``None`` or what did not match."""
    with torch.no_grad():
        ours = decoder.unembed(decoder.normalize(last.to(decoder.W_U.device)))
    error = core_verification.mismatch(ours, own)
    if error > tol:
        return f"row {label!r} decoded differs from the model's own logits {core_verification.by(error, ours, own)}"
    if logits is None:
        return None
    centred = [t.float() - t.float().mean(-1, keepdim=True) for t in (ours, logits.to(ours.device))]
    error = core_verification.mismatch(*centred)
    if error > tol:
        return (f"row {label!r} decoded differs from the wrapped Hugging Face model's logits "
                f"{core_verification.by(error, *centred)}")
    return None


def fit_norm(model, cache, tol):
    """The final norm's convention fitted from its recorded input and output on a bridge (``None`` when the
    norm is not a wrapped Hugging Face module, or no LayerNorm / RMSNorm form reproduces it)."""
    original = getattr(getattr(model, "ln_final", None), "_original_component", None)
    if original is None or "ln_final.hook_in" not in cache.cache_dict or "ln_final.hook_out" not in cache.cache_dict:
        return None
    config = getattr(getattr(model, "original_model", None), "config", None)
    return core_verification.fit_norm(original, cache["ln_final.hook_in"], cache["ln_final.hook_out"],
                                      config, tol)


def sublayers_problem(cache, n, parallel, tol):
    """``None`` if the sublayer hooks add up block by block, else what did not."""
    for layer in range(n):
        names = [f"blocks.{layer}.{hook}" for hook in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out",
                                                       "hook_resid_post") + (() if parallel else ("hook_resid_mid",))]
        missing = [name for name in names if name not in cache.cache_dict]
        if missing:
            return f"the model has no {missing[0]!r}"
        pre, attn, mlp, post = (cache[name] for name in names[:4])
        sums = [(pre + attn + mlp, post, "input + attention write + MLP write", "output")] if parallel else [
            (pre + attn, cache[names[4]], "input + attention write", "hook_resid_mid"),
            (cache[names[4]] + mlp, post, "hook_resid_mid + MLP write", "output")]
        for ours, theirs, what, against in sums:
            error = core_verification.mismatch(ours, theirs)
            if error > tol:
                return (f"block {layer}: {what} is not its {against} "
                        f"(differs {core_verification.by(error, ours, theirs)})")
    return None


def heads_problem(model, split):
    """``None`` if the per-head writes ``split`` returns sum to every attention write on the probe, else what
    did not (a split that fails is a reason too)."""
    _, cache = probe(model, hook_filter(model, attribution=True))
    tol = core_verification.tolerance(model)
    for position in range(core_verification.TOKENS):
        try:
            parts = split(cache, position)
        except Exception as error:
            return f"the heads could not be split ({type(error).__name__}: {str(error)[:200]})"
        heads = parts["heads"].sum(2) + parts["head_bias"]
        for layer in range(model.cfg.n_layers):
            error = core_verification.mismatch(heads[:, layer], parts["attn"][:, layer])
            if error > tol:
                return (f"block {layer}: the heads (hook_z through W_O) do not add up to hook_attn_out "
                        f"(differ {core_verification.by(error, heads[:, layer], parts['attn'][:, layer])})")
    return None


__all__ = ["decoder_for", "require_heads", "verdict_of", "verify", "VERDICTS"]
