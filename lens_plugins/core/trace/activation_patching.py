"""Activation patching inside an nnsight trace (locally or on an NDIF server): one forward over
``[source, target, target x cells]`` copies each cell's source value into its item at that point of the stream,
reads the final residual (and, for the cone, every read row) and reduces them where the model runs, so a remote
request downloads only the metric grid.

Reads and writes follow the stream order of ``core.activation_patching.events``: an nnsight body must touch a
block's input before its attention's output and that before the block's output. Torch only, no decorators:
ships by source.
"""

import torch

from lens_plugins.core.activation_patching import (
    FIRST_PATCHED,
    copy_cells,
    copy_through_write,
    events,
    items_at,
    measure,
    patch_row,
)
from lens_plugins.core.architectures import (
    decoder_tensors,
    get_path,
    layer_input,
    layer_output,
)
from lens_plugins.core.pipeline import check_decoder
from lens_plugins.core.rows import Row
from lens_plugins.core.verification import resolve

FORMAT = "lens_plugins.activation_patching/1"


def patch_and_measure(model, cell_labels, cell_positions, metric_position, metric, answer_id, foil_id=None,
                      lens=None, read_labels=(), paths=None, vocab_chunk=None, token_chunk=None):
    """In a trace over ``[source, target, target x k]``: item ``2 + j`` gets the source's value at row
    ``cell_labels[j]`` and position ``cell_positions[j]``; saves ``metric [2 + k]`` (the metric of the final
    residual at ``metric_position``) and, when ``read_labels`` names rows (the row plan's, ending with the final
    row), ``cone [2 + k, rows, seq]``: the metric read through ``lens`` at every cell of those rows."""
    import nnsight

    spec = resolve(model, paths)
    blocks = get_path(model, spec["layers"])
    final_label = Row(len(blocks) - 1, "post").label
    inputs, reads = {}, {}

    def block_input(layer):
        if layer not in inputs:  # a module's input can be read once per forward pass
            inputs[layer] = layer_input(blocks[layer].inputs)
        return inputs[layer]

    for label, writes, wanted in events(list(cell_labels), list(read_labels) + [final_label]):
        row = patch_row(label)
        items = items_at(cell_labels, label)
        positions = [cell_positions[i - FIRST_PATCHED] for i in items]
        if row.site == "mid":
            resid = block_input(row.layer)
            module = get_path(blocks[row.layer], spec.get("attn_out", spec["attn"]))
            write = layer_output(module.output).reshape(resid.shape)
            if writes:
                copy_through_write(resid, write, items, positions)
            hidden = resid + write
        else:
            hidden = layer_output(blocks[row.layer].output) if row.site == "post" else block_input(row.layer)
            if writes:
                copy_cells(hidden, items, positions)
        if wanted:
            reads[label] = hidden.detach().float().clone()
    decoder = decoder_tensors(model, spec)
    check_decoder(decoder)
    read_rows = [patch_row(label) for label in read_labels]
    stack = torch.stack([reads[label] for label in read_labels]) if read_rows else None
    with torch.no_grad():
        out = measure(reads[final_label][:, metric_position], stack, read_rows, lens, decoder, metric, answer_id,
                      foil_id, vocab_chunk, token_chunk)
    return nnsight.save({"format": FORMAT, **{name: value.detach().cpu() for name, value in out.items()}})

__all__ = ["FORMAT", "patch_and_measure"]
