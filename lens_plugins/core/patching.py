"""Patchscopes in torch: the patching arithmetic every backend shares (which (row, position) pairs go into
which target forward, how a source hidden state is mapped, where in a batch it is written, how the target's
read-out is laid out for the streamed readout) . The trace bodies that run inside an nnsight trace are in ``core/trace/patchscope.py``.

A Patchscope (Ghandeharioun et al., 2024) takes the hidden state ``h`` of a source prompt at row ``l``
(a point of the residual stream: ``embed``, ``3_pre``, ``29_post``) and position ``i``, writes ``f(h)`` into
a target prompt at row ``l*`` and position ``i*``, runs the target forward and reads what the model says at
``i*``. Many pairs share one target forward: batch item ``b`` of the target carries pair ``b``'s patch.

Torch only, no decorators, everything as arguments: ships by source.
"""

import torch

from lens_plugins.core.errors import LensValueError
from lens_plugins.core.rows import Row

# The residual sites a Patchscope reads and writes (a block's input, or its output), in stream order
# within one layer.
_SITE_ORDER = {"embed": 0, "pre": 0, "post": 2}


def patch_row(label):
    """The ``Row`` a Patchscope reads or writes at, refusing a site that is not a block's input or output."""
    row = Row.parse(label) if isinstance(label, str) else label
    if row.site not in _SITE_ORDER:
        raise LensValueError(f"a Patchscope reads and writes rows 'embed', '<layer>_pre' or '<layer>_post', "
                         f"not {row.label!r}")
    return row


def stream_key(label):
    """Sort key of a residual row label (``"embed"``, ``"3_pre"``, ``"3_post"``) in forward order, so that the
    writes of one target forward happen in the order the model reaches them. ``3_post`` and ``4_pre`` are
    the same point of the stream; the key puts ``3_post`` first."""
    row = patch_row(label)
    return (row.layer, _SITE_ORDER[row.site])


def pair_batches(n_rows, n_positions, batch_size):
    """The (row index, position index) pairs of an ``n_rows x n_positions`` grid, row-major, cut into batches
    of at most ``batch_size``: one target forward each. Returns a list of ``(rows, positions)`` long tensors."""
    if batch_size < 1:
        raise LensValueError(f"batch_size must be at least 1, got {batch_size}")
    rows = torch.arange(n_rows).repeat_interleave(n_positions)
    positions = torch.arange(n_positions).repeat(n_rows)
    return [(rows[i:i + batch_size], positions[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def apply_mapping(hidden, weight=None, bias=None):
    """The affine mapping ``h @ weight.T + bias`` of ``hidden [..., d_in]`` (either term may be ``None``),
    computed in float32 and returned in float32. ``weight`` is ``[d_out, d_in]`` as in ``torch.nn.Linear``:
    unlike a tuned-lens translator it is not applied residually (pass ``I + A`` for ``h + A h``)."""
    hidden = hidden.float()
    if weight is not None:
        if weight.shape[-1] != hidden.shape[-1]:
            raise LensValueError(f"the mapping's weight is {tuple(weight.shape)}, which does not take hidden states of "
                             f"width {hidden.shape[-1]}: it must be [d_out, {hidden.shape[-1]}]")
        hidden = hidden @ weight.float().T.to(hidden.device)
    if bias is not None:
        hidden = hidden + bias.float().to(hidden.device)
    return hidden


def sites_of(target_labels):
    """``{label: batch indices}`` for the target rows of one batch, in forward (stream) order: each label is
    one write, of the batch items that carry a patch there."""
    order = sorted(set(target_labels), key=stream_key)
    return {label: [b for b, own in enumerate(target_labels) if own == label] for label in order}


def write_rows(hidden, batch_index, position, values):
    """Write ``values [k, d]`` into ``hidden [batch, seq, d]`` at ``(batch_index[j], position)``, in place, in
    ``hidden``'s dtype and device; returns ``hidden``."""
    index = torch.as_tensor(batch_index, dtype=torch.long, device=hidden.device)
    hidden[index, position] = values.to(hidden.device, hidden.dtype)
    return hidden


def readout_stack(patched, reference):
    """The readout's ``[2, k, d]`` stack for ``k`` pairs: row 0 is the target's final residual at ``i*`` of each
    pair, row 1 (the readout's reference, "final") the source's own final residual at the pair's source
    position, so that divergences and the final top-1 compare what the Patchscope says with what the model
    itself predicted there."""
    return torch.stack([patched.float(), reference.float().to(patched.device)])


def patched_statistics(stats):
    """Row 0 of the readout's ``[2, k, ...]`` statistics (the Patchscope's own; row 1 is the reference);
    ``final_top1`` (``[k]``, the reference's argmax) is kept as it is."""
    return {name: value if name == "final_top1" else value[0] for name, value in stats.items()}


def scatter_pairs(chunks, n_rows, n_positions):
    """Stitch per-batch statistics ``[(rows, positions, {name: [k, ...]})]`` into ``{name: [n_rows, n_positions,
    ...]}``; ``final_top1`` (one value per position) becomes ``[n_positions]``."""
    out = {}
    for rows, positions, stats in chunks:
        for name, value in stats.items():
            value = value.cpu()
            if name == "final_top1":
                if name not in out:
                    out[name] = torch.zeros(n_positions, dtype=value.dtype)
                out[name][positions] = value
                continue
            if name not in out:
                out[name] = torch.zeros((n_rows, n_positions) + tuple(value.shape[1:]), dtype=value.dtype)
            out[name][rows, positions] = value
    return out

__all__ = ["patch_row", "stream_key", "pair_batches", "apply_mapping", "sites_of", "write_rows", "readout_stack",
    "patched_statistics", "scatter_pairs"]
