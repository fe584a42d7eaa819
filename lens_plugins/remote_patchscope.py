"""The Patchscope inside nnsight traces: the part that runs where the model runs (locally or on NDIF).

Two trace bodies, each a function called inside ``with model.trace(...)``:

- ``read_source(model, positions)`` in the source prompt's trace: saves the residual rows ("embed",
  "1_pre", ..., "<L-1>_post", as the logit lens labels them) at the chosen positions, ``[rows, positions, d]``.
- ``patch_and_read(model, ...)`` in a target trace over a batch of ``k`` copies of the target prompt: writes
  pair ``b``'s (already mapped) hidden state into batch item ``b`` at its target row and position (a row's
  ``pre`` is the input of that decoder layer, ``post`` its output), reads the last layer's output at the
  target position and reduces it with the streamed readout against the source's own final residual. Only the
  reductions (and, for generation, one token id per item) are saved.

Like ``remote`` it imports only torch and modules that ship by source, carries no decorators and returns
plain dicts; ``lens_plugins.adapters.patchscope_nnsight`` registers it with ``nnsight.register``.
"""

import torch

from lens_plugins.architectures import decoder_tensors, get_path, layer_input, layer_output, resolve
from lens_plugins.core.patching import readout_stack, sites_of, write_rows
from lens_plugins.readout import lens_statistics
from lens_plugins.remote import _prompt, _residual_stack

SOURCE_FORMAT = "lens_plugins.patchscope_source/1"
FORMAT = "lens_plugins.patchscope/1"


def read_source(model, positions, layers=None, final_norm=None, lm_head=None):
    """Save the source prompt's residual rows at ``positions`` (absolute indices), ``[rows, positions, d]``,
    with the row labels and the prompt's token ids. Call it first in the source trace's body."""
    import nnsight

    spec = resolve(model, layers, final_norm, lm_head)
    token_ids, _ = _prompt(model)
    if token_ids.shape[0] != 1:
        raise ValueError(f"a Patchscope reads one source prompt, got a batch of {token_ids.shape[0]}")
    stack, labels = _residual_stack(model, spec)
    return nnsight.save({
        "format": SOURCE_FORMAT,
        "hidden": stack[:, 0, list(positions)].detach().cpu(),
        "labels": labels,
        "token_ids": token_ids.cpu(),
    })


def _site(blocks, label):
    """The envoy and attribute a row label is written at: a layer's input (``pre``, ``embed``) or output."""
    if label == "embed":
        return blocks[0], "input"
    layer, _, site = label.partition("_")
    return blocks[int(layer)], "input" if site == "pre" else "output"


def _write(model, spec, values, target_labels, position):
    """Write each batch item's value at its target row, in forward order; returns the decoder layers."""
    blocks = get_path(model, spec["layers"])
    for label, batch_index in sites_of(list(target_labels)).items():
        block, attribute = _site(blocks, label)
        hidden = layer_input(block.inputs) if attribute == "input" else layer_output(block.output)
        write_rows(hidden, batch_index, position, values[batch_index])
    return blocks


def patch_and_read(model, values, target_labels, position, reference, target_ids, top_k, reductions,
                   read_next_token=False, layers=None, final_norm=None, lm_head=None, vocab_chunk=4096,
                   token_chunk=256):
    """In a trace over ``k`` copies of the target prompt: write ``values [k, d]`` at ``(b, position)`` of row
    ``target_labels[b]``, then reduce the last layer's output at ``position`` against ``reference [k, d]``
    (the source's own final residual for each pair) with ``readout.lens_statistics``; ``target_ids [k, C]``
    are the token ids to rank per pair. ``read_next_token`` also saves the argmax at the prompt's last
    position (the first greedily generated token). Returns the saved readout's ``[2, k, ...]`` statistics."""
    import nnsight

    spec = resolve(model, layers, final_norm, lm_head)
    blocks = _write(model, spec, values, target_labels, position)
    final = layer_output(blocks[len(blocks) - 1].output)[:, position]
    decoder = decoder_tensors(model, spec)
    with torch.no_grad():
        stats = lens_statistics(readout_stack(final.detach(), reference), **decoder, top_k=top_k,
                                target_ids=target_ids, vocab_chunk=vocab_chunk, token_chunk=token_chunk,
                                reductions=tuple(reductions))
    saved = {"format": FORMAT, "stats": {name: value.cpu() for name, value in stats.items()}}
    if read_next_token:
        saved["next_token"] = get_path(model, spec["lm_head"]).output[:, -1].argmax(-1).cpu()
    return nnsight.save(saved)


def patch_and_next_token(model, values, target_labels, position, layers=None, final_norm=None, lm_head=None):
    """One greedy step of a patched target: the same writes as ``patch_and_read``, then the argmax of the
    logits at the last position ``[k]`` (a soft-cap, applied after ``lm_head``, keeps the argmax)."""
    import nnsight

    spec = resolve(model, layers, final_norm, lm_head)
    _write(model, spec, values, target_labels, position)
    return nnsight.save(get_path(model, spec["lm_head"]).output[:, -1].argmax(-1).cpu())
