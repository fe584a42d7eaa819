"""One lens pipeline for every backend: read the rows, check them, apply the lens, decode and reduce.

A backend supplies a *reader*, ``read(rows, positions=None) -> [rows, batch, positions or seq, d_model]``
(TransformerLens: row -> hook name in a cache; nnsight: row -> a module's input or output inside a trace;
only the positions asked for are read: ``positions`` indexes the sequence axis, a list or a slice), and a request
(``request.build``); ``logit_lens`` and ``logit_diff`` do the rest the same way for both, so every check
and default is shared. Torch only: on a remote nnsight trace this runs on the server.
"""

import torch

from lens_plugins.core import lenses, track
from lens_plugins.core.dla import column_logits
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.readout import all_finite, lens_statistics
from lens_plugins.core.request import readout_reductions, target_columns, user_ids


def check_finite(stack, labels, positions):
    """Refuse a residual stack ``[row, batch, pos, d_model]`` holding NaN or inf, naming the first bad entry:
    the final norm would turn it into NaN log-probs everywhere downstream."""
    if all_finite(stack):
        return
    bad = ~torch.isfinite(stack).all(-1)
    if bad.any():
        row, item, pos = (int(i) for i in bad.nonzero()[0])
        kind = "NaN" if torch.isnan(stack[row, item, pos]).any() else "inf"
        raise LensValueError(
            f"the residual stream contains {kind} at row {labels[row]!r}, batch item {item}, prompt position "
            f"{positions[pos]} ({int(bad.sum())} non-finite vectors in all); the lens would only propagate it. "
            "Check the activations (an overflow in half precision?) before decoding them."
        )


def check_decoder(decoder):
    """Refuse a decoder (a ``readout.DecoderTensors``) whose unembedding ``W_U``, its bias ``b_U`` or the final
    norm's weight or bias holds NaN or inf, naming which: one such value makes every logit it touches NaN, so
    every statistic of every row would be NaN. One sum per tensor (``readout.all_finite``): a few milliseconds
    for SmolLM2's ``W_U``."""
    parts = {"W_U": "the unembedding", "b_U": "the unembedding's bias", "norm_weight": "the final norm's weight",
             "norm_bias": "the final norm's bias"}
    for name, what in parts.items():
        tensor = getattr(decoder, name)
        if tensor is not None and not all_finite(tensor):
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
            raise LensValueError(
                f"the decoder's {name} ({what}) holds {kind} ({int((~torch.isfinite(tensor)).sum())} of "
                f"{tensor.numel()} values non-finite): every logit it touches would be NaN. The model's weights are "
                "damaged (a failed load, an overflow in half precision, an edit): reload them")


def check_rows(request, chosen, all_rows):
    """Refuse a row selection the request cannot be computed on."""
    if "kl_input_row" in request["reductions"] and chosen[0] != all_rows[0]:
        raise LensValueError("kl_input_row compares every row with the input row ('embed'): keep row 0 in layers")


def sequence_index(positions):
    """What a reader cuts the sequence axis with for ``positions`` (sorted, unique, absolute): a slice when they
    are contiguous (every position, or ``[-1]``), so that each row is cut as a view, not copied (a full-prompt
    lens would otherwise copy the whole stack once more); the list otherwise."""
    first = positions[0]
    return slice(first, first + len(positions)) if positions[-1] - first == len(positions) - 1 else list(positions)


def lens_rows(read, rows, positions, lens, decoder):
    """``[rows, batch * positions, d_model]``: the rows read, checked and mapped through the lens, which is
    checked against the model ``decoder`` belongs to (``lenses.resolve``); the decoder itself is checked finite."""
    check_decoder(decoder)
    d_model = decoder.d_model
    selected = read(rows, sequence_index(positions))
    labels = [row.label for row in rows]
    if selected.shape[0] != len(rows):
        raise LensValueError(f"the reader returned {selected.shape[0]} rows for {len(rows)} rows asked for")
    if selected.shape[-1] != d_model:
        raise LensValueError(
            f"residual vectors have width {selected.shape[-1]} but this decoder's W_U expects d_model={d_model}: "
            "the activations come from a different model than the one decoding them")
    check_finite(selected, labels, positions)
    flat = selected.reshape(len(rows), selected.shape[1] * len(positions), d_model)
    weight, bias, transform = lenses.resolve(lens, rows, decoder)
    with torch.no_grad():
        return lenses.apply(flat.detach(), rows, weight, bias, transform)


def logit_lens(read, rows, request, decoder, token_ids, attention_mask, lens=None, vocab_chunk=None,
               token_chunk=None, precision="float32"):
    """The readout statistics (``readout.lens_statistics``) of ``rows`` at the request's positions.
    ``decoder`` is a ``readout.DecoderTensors`` (``architectures.decoder_tensors``); tile sizes ``None`` are
    chosen for the device ``W_U`` lives on, ``precision`` is the unembedding matmul's (``readout.PRECISIONS``)."""
    positions = request["positions"]
    flat = lens_rows(read, rows, positions, lens, decoder)
    columns = target_columns(token_ids, attention_mask, positions, request["reductions"], user_ids(request))
    wanted = readout_reductions(request["reductions"], len(user_ids(request)))
    n_auto = request.get("auto_tokens", 0)
    if n_auto and "top_k" not in wanted:
        wanted = wanted + ("top_k",)  # the candidates are every row's top-k
    with torch.no_grad():
        stats = lens_statistics(
            flat, decoder, top_k=request["top_k"], target_ids=columns, vocab_chunk=vocab_chunk,
            token_chunk=token_chunk, reductions=wanted, precision=precision,
        )
        if n_auto:
            stats.update(tracked_tokens(flat, decoder, stats, n_auto))
            if "top_k" not in request["reductions"]:
                del stats["top_ids"], stats["top_logprobs"]
    return stats


def tracked_tokens(flat, decoder, stats, n):
    """``core.track.auto_tokens`` of the lens-mapped rows ``flat [rows, tokens, d_model]`` from the readout's
    ``stats`` (its top-k and log-partition): the second, vocabulary-free pass of ``auto_tokens=``."""
    normed = decoder.normalize(flat.to(decoder.W_U.device))
    return track.auto_tokens(normed, decoder, stats["log_partition"], stats["top_ids"], n)


def set_logit(normed, decoder, ids):
    """Log-sum-exp of the logits of ``ids`` at every vector of ``normed``: ``d_model`` dot products per member."""
    return column_logits(normed, decoder, ids)[1].logsumexp(-1)


def check_not_padding(positions, attention_mask):
    """Refuse decoded positions that are padding in some prompt of the batch (``attention_mask [batch, seq]``,
    0 on padding; ``None``: no padding): a logit difference there scores a pad token, a finite, plausible and
    meaningless number that a mean over the batch would silently take in (no mask field could stop that)."""
    if attention_mask is None:
        return
    padded = attention_mask[:, positions] == 0
    if bool(padded.any()):
        item, index = (int(i) for i in padded.nonzero()[0])
        raise LensValueError(
            f"position {positions[index]} is padding in prompt {item} of the batch ({int(padded.any(0).sum())} of "
            f"the {len(positions)} positions asked for are padding in some prompt): a logit difference there would "
            "score a pad token. Pad on the left (padding_side='left') and pass positions=-1 to compare every "
            "prompt's last token, pass positions that are real in every prompt, or run the prompts one at a time.")


def logit_diff(read, rows, positions, decoder, target_ids, distractor_ids, batch, lens=None, attention_mask=None):
    """``[rows, batch, positions]``: each row decoded with the model's own final norm (its real scale at that
    row) and compared on the two token sets: ``log P(target set) - log P(distractor set)``. Positions that are
    padding in some prompt (``attention_mask``) are refused (``check_not_padding``)."""
    check_not_padding(positions, attention_mask)
    flat = lens_rows(read, rows, positions, lens, decoder)
    normed = decoder.normalize(flat.to(decoder.W_U.device))
    diff = set_logit(normed, decoder, target_ids) - set_logit(normed, decoder, distractor_ids)
    return diff.reshape(len(rows), batch, len(positions))

__all__ = ["check_finite", "check_decoder", "check_rows", "sequence_index", "lens_rows", "logit_lens", "tracked_tokens", "set_logit", "check_not_padding",
           "logit_diff"]
