"""Activation patching in torch: which residual cell each batch item patches, the in-place copy from the
source item, and the metric of decoded vectors. The trace body that runs it inside an nnsight trace is
``core/trace/activation_patching.py``; TransformerLens calls the same functions from its hooks.

One forward pass per batch of cells: batch item 0 is the source prompt, item 1 the unpatched target, and
item ``2 + j`` the target with cell ``j`` (a residual row and a position) overwritten by item 0's value there,
at that point of the same forward. Source, target and patched runs therefore share one forward's shapes, so
a cell whose copy changes nothing (a prompt patched into itself) leaves its item bit-identical to item 1, and
a patch of the final row at the metric position gives item 0's metric exactly: a separate forward of another
batch size would differ by float rounding.

Torch only, no decorators, everything as arguments: ships by source.
"""

import torch

from lens_plugins.core import lenses
from lens_plugins.core.dla import column_logits
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.readout import lens_statistics
from lens_plugins.core.rows import Row

SOURCE, TARGET, FIRST_PATCHED = 0, 1, 2
METRICS = ("logit_diff", "prob", "rank")
# Residual rows a patch writes, in stream order within a layer: a block's input, between its attention and
# its MLP, its output.
_SITE_ORDER = {"embed": 0, "pre": 0, "mid": 1, "post": 2}


def patch_row(label):
    """The ``Row`` of a residual label a patch writes at (``embed``, ``3_pre``, ``3_mid``, ``29_post``), refusing a
    sublayer row: a sublayer's write is not a point of the stream that later blocks read."""
    row = Row.parse(label) if isinstance(label, str) else label
    if row.site not in _SITE_ORDER:
        raise LensValueError(f"activation patching writes residual rows ('embed', '<layer>_pre', '<layer>_mid', "
                             f"'<layer>_post'), not {row.label!r}: drop sublayers=")
    return row


def stream_key(label):
    """Forward-order sort key of a residual row label: ``3_pre`` < ``3_mid`` < ``3_post`` < ``4_pre``."""
    row = patch_row(label)
    return (row.layer, _SITE_ORDER[row.site])


def check_metric(metric, has_foil):
    """Refuse an unknown metric, and a logit difference without the foil it subtracts."""
    if metric not in METRICS:
        raise LensValueError(f"metric={metric!r} is not one of {list(METRICS)}")
    if metric == "logit_diff" and not has_foil:
        raise LensValueError("metric='logit_diff' is logit(answer) - logit(foil): pass foil= (the token the "
                             "target prompt favours), or use metric='prob' or 'rank'")


def events(patch_labels, read_labels):
    """The stream points a patched forward visits, in forward order: ``[(label, writes, reads)]``, where a point
    that is written and read is written first (the read sees the patched value)."""
    labels = sorted(set(patch_labels) | set(read_labels), key=stream_key)
    return [(label, label in patch_labels, label in read_labels) for label in labels]


def items_at(cell_labels, label):
    """Batch items (``FIRST_PATCHED + j``) whose cell ``j`` patches row ``label``."""
    return [FIRST_PATCHED + j for j, own in enumerate(cell_labels) if own == label]


def copy_cells(hidden, items, positions):
    """Overwrite ``hidden [batch, seq, d]`` at ``(items[j], positions[j])`` with the source item's value at
    ``positions[j]``, in place; returns ``hidden``."""
    index = torch.as_tensor(items, dtype=torch.long, device=hidden.device)
    where = torch.as_tensor(positions, dtype=torch.long, device=hidden.device)
    hidden[index, where] = hidden[SOURCE, where]
    return hidden


def copy_through_write(block_input, write, items, positions):
    """Patch the residual between a block's attention and its MLP (``mid = block_input + write``) where only the
    attention's ``write [batch, seq, d]`` can be changed (an nnsight module output): item ``i`` gets
    ``write[source] + (block_input[source] - block_input[i])``, which is exactly the source's write when the two
    inputs agree and the source's ``mid`` up to one rounding otherwise. In place; returns ``write``."""
    index = torch.as_tensor(items, dtype=torch.long, device=write.device)
    where = torch.as_tensor(positions, dtype=torch.long, device=write.device)
    shift = block_input[SOURCE, where].to(write.dtype) - block_input[index, where].to(write.dtype)
    write[index, where] = write[SOURCE, where] + shift
    return write


def metric_values(resid, decoder, metric, answer_id, foil_id=None, vocab_chunk=None, token_chunk=None):
    """The metric of every vector of ``resid [rows, n, d]`` decoded by ``decoder`` (final norm, unembedding,
    soft-cap), float32 ``[rows, n]``: ``logit_diff`` (logit of ``answer_id`` minus logit of ``foil_id``: two dot
    products, no vocabulary pass), ``prob`` (probability of ``answer_id``) or ``rank`` (its rank, 1 = top;
    both from the streamed readout, never a ``[rows, n, vocab]`` tensor)."""
    resid = resid.float().to(decoder.W_U.device)
    if metric == "logit_diff":
        normed = decoder.normalize(resid)
        _, logits = column_logits(normed, decoder, [answer_id, foil_id])
        return logits[..., 0] - logits[..., 1]
    _, n, _ = resid.shape
    targets = torch.full((n, 1), int(answer_id), dtype=torch.long, device=resid.device)
    stats = lens_statistics(resid, decoder, top_k=1, target_ids=targets, vocab_chunk=vocab_chunk,
                            token_chunk=token_chunk, reductions=("targets",))
    if metric == "prob":
        return stats["target_logprobs"][..., 0].exp()
    return stats["target_ranks"][..., 0].float()


def measure(final, read_stack, read_rows, lens, decoder, metric, answer_id, foil_id=None, vocab_chunk=None,
            token_chunk=None):
    """What a patched forward returns, the same on both backends: ``metric [batch]``, the metric of the final
    residual ``final [batch, d]`` at the metric position, and with a ``read_stack [rows, batch, seq, d]`` (the
    rows ``read_rows`` of the patched forward) ``cone [batch, rows, seq]``, the same metric read through ``lens``
    (``None``: the logit lens) at every cell."""
    out = {"metric": metric_values(final[None], decoder, metric, answer_id, foil_id, vocab_chunk, token_chunk)[0]}
    if read_stack is not None:
        n_rows, batch, seq, d = read_stack.shape
        weight, bias, transform = lenses.resolve(lens, list(read_rows), decoder)
        with torch.no_grad():
            flat = lenses.apply(read_stack.reshape(n_rows, batch * seq, d).float(), list(read_rows), weight, bias,
                                transform)
        cone = metric_values(flat, decoder, metric, answer_id, foil_id, vocab_chunk, token_chunk)
        out["cone"] = cone.reshape(n_rows, batch, seq).permute(1, 0, 2).contiguous()
    return out


def batch_tokens(source_ids, target_ids, n_cells):
    """``[2 + n_cells, seq]``: the source, the target, and one target copy per patched cell."""
    return torch.cat([source_ids.reshape(1, -1), target_ids.reshape(1, -1).expand(1 + n_cells, -1)])

__all__ = ["SOURCE", "TARGET", "FIRST_PATCHED", "METRICS", "patch_row", "stream_key", "check_metric", "events",
           "items_at", "copy_cells", "copy_through_write", "metric_values", "measure", "batch_tokens"]
