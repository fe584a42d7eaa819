"""Patchscopes inside an nnsight trace (locally or on an NDIF server): read the source rows, write mapped
hidden states into the target's rows and reduce the target's last row where the model runs.

The bodies read rows with ``reader`` (the logit lens's rows, ``core.rows``), use the write arithmetic of
``core.patching`` and save only plain dicts and tensors. Torch only, no decorators: ships by source.
"""

import torch

from lens_plugins.core.architectures import decoder_tensors, get_path, layer_input, layer_output
from lens_plugins.core.verification import resolve
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.patching import patch_row, readout_stack, sites_of, write_rows
from lens_plugins.core.pipeline import check_decoder
from lens_plugins.core.readout import lens_statistics
from lens_plugins.core.rows import Row
from lens_plugins.core.trace.reader import model_input, reader

SOURCE_FORMAT = "lens_plugins.patchscope_source/2"
FORMAT = "lens_plugins.patchscope/1"


def read_source(model, labels, positions, paths=None):
    """In the source prompt's trace: save the rows ``labels`` (the logit lens's, e.g. ``["embed", "12_pre",
    "29_post"]``, in stream order) at ``positions`` (absolute indices), ``[rows, positions, d]`` float32, with
    the prompt's token ids. Call it first in the trace's body."""
    import nnsight

    token_ids, _ = model_input(model)
    if token_ids.shape[0] != 1:
        raise LensValueError(f"a Patchscope reads one source prompt, got a batch of {token_ids.shape[0]}")
    stack = reader(model, resolve(model, paths))([patch_row(label) for label in labels], list(positions))
    return nnsight.save({
        "format": SOURCE_FORMAT,
        "hidden": stack[:, 0].detach().cpu(),
        "labels": list(labels),
        "token_ids": token_ids.cpu(),
    })


def _write(model, spec, values, target_labels, position):
    """Write each batch item's value at its target row, in forward order: ``embed`` / ``L_pre`` into block
    ``L``'s input, ``L_post`` into its output. Returns the decoder layers."""
    blocks = get_path(model, spec["layers"])
    for label, batch_index in sites_of(list(target_labels)).items():
        row = patch_row(label)
        block = blocks[row.layer]
        hidden = layer_output(block.output) if row.site == "post" else layer_input(block.inputs)
        write_rows(hidden, batch_index, position, values[batch_index])
    return blocks


def patch_and_read(model, values, target_labels, position, reference, target_ids, top_k, reductions,
                   read_next_token=False, paths=None, vocab_chunk=None, token_chunk=None):
    """In a trace over ``k`` copies of the target prompt: write ``values [k, d]`` at ``(b, position)`` of row
    ``target_labels[b]``, then reduce the last layer's output at ``position`` against ``reference [k, d]``
    (the source's own final residual for each pair) with ``readout.lens_statistics``; ``target_ids [k, C]``
    are the token ids to rank per pair. ``read_next_token`` also saves the argmax at the prompt's last
    position (the first greedily generated token). Saves the readout's ``[2, k, ...]`` statistics."""
    import nnsight

    spec = resolve(model, paths)
    blocks = _write(model, spec, values, target_labels, position)
    final = reader(model, spec)([Row(len(blocks) - 1, "post")], [position])[0][:, 0]
    decoder = decoder_tensors(model, spec)
    check_decoder(decoder)
    with torch.no_grad():
        stats = lens_statistics(readout_stack(final.detach(), reference), decoder,
                                top_k=top_k, target_ids=target_ids, vocab_chunk=vocab_chunk,
                                token_chunk=token_chunk, reductions=tuple(reductions))
    saved = {"format": FORMAT, "stats": {name: value.cpu() for name, value in stats.items()}}
    if read_next_token:
        saved["next_token"] = get_path(model, spec["lm_head"]).output[:, -1].argmax(-1).cpu()
    return nnsight.save(saved)


def patch_and_next_token(model, values, target_labels, position, paths=None):
    """One greedy step of a patched target: the same writes as ``patch_and_read``, then the argmax of the
    logits at the last position ``[k]`` (a soft-cap, applied after ``lm_head``, keeps the argmax)."""
    import nnsight

    spec = resolve(model, paths)
    _write(model, spec, values, target_labels, position)
    return nnsight.save(get_path(model, spec["lm_head"]).output[:, -1].argmax(-1).cpu())

__all__ = ["SOURCE_FORMAT", "FORMAT", "read_source", "patch_and_read", "patch_and_next_token"]
