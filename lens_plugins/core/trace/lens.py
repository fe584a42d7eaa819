"""The logit lens and the logit difference inside an nnsight trace (locally or on an NDIF server).

The body of ``with model.trace(...)`` calls ``logit_lens`` / ``logit_diff``; they read rows with
``reader``, decode and reduce them with ``core.pipeline`` where the model runs (``lm_head.weight`` never
leaves the server) and save only plain dicts, lists and small tensors (a class of ours would not unpickle on
the far side). Type checks and labelling stay on the caller's machine (``lens_plugins.backends.nnsight``).
"""

from lens_plugins.core import pipeline, request
from lens_plugins.core.architectures import decoder_tensors
from lens_plugins.core.verification import resolve
from lens_plugins.core.defaults import TOP_K
from lens_plugins.core.reductions import DEFAULT_LENS
from lens_plugins.core.trace.reader import model_input, out_of_order, plan, reader

FORMAT = "lens_plugins.nnsight/2"  # marks a saved lens, so the local side can refuse anything else
DIFF_FORMAT = "lens_plugins.logit_diff/1"


def logit_lens(
    model,
    top_k=TOP_K,
    targets=(),
    positions=None,
    token_sets=None,
    reductions=DEFAULT_LENS,
    layers=None,
    resid_mid=False,
    sublayers=False,
    lens=None,
    paths=None,
    vocab_chunk=None,
    token_chunk=None,
    precision="float32",
    auto_tokens=0,
):
    """Run the logit lens on this invoke's rows; call it inside the trace, turn it into a ``LensResult``
    after the trace with ``lp.nnsight.result(lens, model)``. Parameters as the TransformerLens
    ``logit_lens`` (``lens_plugins.backends.nnsight`` documents them); ``paths`` holds module paths for a
    family ``core.architectures`` does not know; ``lens`` is a lens object (a local trace) or
    ``lp.nnsight.lens_tensors(...)`` (any trace); ``precision`` is how the unembedding matmul runs where the
    model runs ("float32", "tf32" on CUDA, "bf16x3"; ``readout.PRECISIONS``), the statistics being float32;
    ``auto_tokens=N`` chooses and traces N tokens per position where the model runs (``core.track``).

    Args:
        model: the nnsight model being traced.
        top_k: tokens kept per row and position.
        targets: single tokens whose rank and log-prob are reported.
        positions: positions to decode; default all.
        token_sets: ``{name: [tokens]}``.
        reductions: what to compute, by name.
        layers: rows to keep, by index or label.
        resid_mid: also decode after each block's attention.
        sublayers: decode after every sublayer.
        lens: a map applied to each row (in a remote body, ``lp.nnsight.lens_tensors(model, lens)``).
        paths: module paths for an unknown family.
        vocab_chunk: vocabulary columns per tile.
        token_chunk: vectors per tile.
        precision: ``"float32"``, ``"tf32"`` or ``"bf16x3"``.

    Returns:
        A saved dict of the reductions; ``lp.nnsight.logit_lens_result(lens, model)`` after the trace makes
        it a ``LensResult``.
    """
    import nnsight
    from nnsight.intervention.interleaver import OutOfOrderError

    spec = resolve(model, paths)
    decoder = decoder_tensors(model, spec)
    every, chosen = plan(model, spec, layers, resid_mid, sublayers)
    try:
        token_ids, mask = model_input(model)
        req = request.build(model.tokenizer, decoder.d_vocab, token_ids.shape[1], top_k, positions,
                            targets, token_sets, reductions, auto_tokens)
        pipeline.check_rows(req, chosen, every)
        stats = pipeline.logit_lens(reader(model, spec), chosen, req, decoder, token_ids.cpu(), mask.cpu(), lens,
                                    vocab_chunk, token_chunk, precision)
    except OutOfOrderError as error:
        raise out_of_order(error) from error
    return nnsight.save({
        "format": FORMAT,
        "stats": {name: value.cpu() for name, value in stats.items()},
        "labels": [row.label for row in chosen],
        "request": req,
        "token_ids": token_ids.cpu(),
        "attention_mask": mask.cpu(),
    })


def logit_diff(model, target, distractor, positions=None, layers=None, resid_mid=False, sublayers=False,
               lens=None, paths=None):
    """The lens's ``target`` minus ``distractor`` log-probability (token sets: log-sum-exp of members) at
    every chosen row and position; turn it into a ``LogitDiff`` with ``lp.nnsight.logit_diff_result``."""
    import nnsight
    from nnsight.intervention.interleaver import OutOfOrderError

    spec = resolve(model, paths)
    decoder = decoder_tensors(model, spec)
    d_vocab = decoder.d_vocab
    target_ids = request.token_set_ids(model.tokenizer, target, d_vocab)
    distractor_ids = request.token_set_ids(model.tokenizer, distractor, d_vocab, "distractor")
    _, chosen = plan(model, spec, layers, resid_mid, sublayers)
    try:
        token_ids, mask = model_input(model)
        chosen_positions = request.resolve_positions(positions, token_ids.shape[1])
        values = pipeline.logit_diff(reader(model, spec), chosen, chosen_positions, decoder, target_ids,
                                     distractor_ids, token_ids.shape[0], lens, mask.cpu())
    except OutOfOrderError as error:
        raise out_of_order(error) from error
    return nnsight.save({
        "format": DIFF_FORMAT,
        "values": values.detach().cpu(),
        "labels": [row.label for row in chosen],
        "positions": chosen_positions,
        "target_ids": target_ids,
        "distractor_ids": distractor_ids,
    })

__all__ = ["FORMAT", "DIFF_FORMAT", "logit_lens", "logit_diff"]
