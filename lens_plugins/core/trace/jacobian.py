"""Jacobian-lens edits inside an nnsight trace (locally or on an NDIF server): write each edited block's
output in place with ``core.jacobian.edit``, and save the last position's logits for ``run_jacobian_edit``.

Torch only, no decorators: ships by source. The edits are plain dicts of tensors (``Edit.specs``), so a remote
request carries them with the body.
"""

import torch

from lens_plugins.core.architectures import decoder_tensors, get_path, layer_output
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.jacobian import edit, prompt_jacobians
from lens_plugins.core.verification import resolve


def jacobian_edit(model, specs, paths=None):
    """In a trace: apply ``specs`` (``{block: edit spec}``, an ``Edit``'s ``specs``) to the block outputs, in
    forward order. Returns the blocks edited."""
    spec = resolve(model, paths)
    blocks = get_path(model, spec["layers"])
    layers = sorted(specs)
    if layers and not 0 <= layers[-1] < len(blocks):
        raise LensValueError(f"the edit names blocks {layers}, but the model has {len(blocks)}")
    for layer in layers:
        hidden = layer_output(blocks[layer].output)
        hidden[:] = edit(hidden, specs[layer])
    return layers


def edited_logits(model, specs, paths=None):
    """In a trace: apply ``specs`` (none for the clean run) and save the logits at the last position
    ``[batch, vocab]`` (float32), soft-capped as the model's output is (a family's soft-cap comes after
    ``lm_head``)."""
    import nnsight

    spec = resolve(model, paths)
    if specs:
        jacobian_edit(model, specs, paths)
    logits = get_path(model, spec["lm_head"]).output[:, -1].float()
    softcap = decoder_tensors(model, spec).softcap
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return nnsight.save(logits.detach().cpu())



def fit_prompt(model, layers, positions, chunk, paths=None):
    """In a trace of one prompt (locally or on an NDIF server): the prompt's Jacobian-lens matrices for the
    block outputs ``layers`` (``core.jacobian.prompt_jacobians`` on the live graph, where the model runs),
    saved as ``[len(layers), d, d]`` float32. The earliest source output is made to require grad, so frozen
    parameters are fine; the forward must not run under ``torch.no_grad``. Only the matrices travel back."""
    import nnsight

    spec = resolve(model, paths)
    blocks = get_path(model, spec["layers"])
    wanted = sorted(set(layers)) + [len(blocks) - 1]
    outputs = []
    for layer in wanted:
        hidden = layer_output(blocks[layer].output)
        if not outputs and not hidden.requires_grad:
            # Frozen parameters (an NDIF server freezes every model it loads) build no graph: rooting it at the
            # earliest source output, before the later blocks read it, records exactly the blocks the fit needs.
            hidden.requires_grad_(True)
        outputs.append(hidden)
    if not outputs[-1].requires_grad:
        raise LensValueError("the forward pass carries no gradients (run under torch.no_grad, or the model's "
                             "parameters are frozen where it runs): the Jacobian lens needs its graph")
    with torch.enable_grad():
        matrices = prompt_jacobians(outputs[-1], outputs[:-1], positions, chunk)
    return nnsight.save(torch.stack(matrices))

__all__ = ["jacobian_edit", "edited_logits", "fit_prompt"]
