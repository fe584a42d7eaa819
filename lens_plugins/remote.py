"""The logit lens inside an nnsight trace: the part that runs where the model runs.

``logit_lens(model, ...)`` is called in the body of ``with model.trace(...)`` (or of a ``tracer.invoke``).
On an NDIF server the body runs remotely, so this module obeys the server's rules, like ``readout`` and
``architectures``: it imports only torch (and nnsight, which the server has), reads every tensor from the
model's own modules inside the trace (``lm_head.weight`` never leaves the server), carries no decorators,
and returns only plain dicts, lists and small tensors (a class of ours would not unpickle on the far
side). ``lens_plugins.adapters.nnsight`` registers these three modules with ``nnsight.register`` so they
ship by source; type checks and labelling stay on the caller's machine.

What comes back is ``save``d: the reductions of ``readout.lens_statistics`` (``O(rows x tokens x top_k)``),
the prompt's token ids and mask, and the bookkeeping to label them; never a per-layer distribution.
"""

import torch

from lens_plugins.architectures import decoder_tensors, get_path, layer_input, layer_output, resolve
from lens_plugins.prompt import (
    DEFAULT_LENS_REDUCTIONS, check_reductions, readout_reductions, resolve_positions, single_token_id, target_columns,
)
from lens_plugins.readout import lens_statistics
from lens_plugins.remote_attribution import attribution, sublayer_stack

FORMAT = "lens_plugins.nnsight/1"  # marks a saved lens, so the local side can refuse anything else


def logit_lens(
    model,
    top_k=10,
    targets=(),
    positions=None,
    token_sets=None,
    reductions=DEFAULT_LENS_REDUCTIONS,
    layers=None,
    final_norm=None,
    lm_head=None,
    vocab_chunk=None,
    token_chunk=None,
    sublayers=False,
    precision="float32",
):
    """Run the logit lens on this invoke's rows; call it inside the trace, turn it into a ``LensResult``
    after the trace with ``lp.nnsight.result(lens, model)``.

    Reads, in forward order, the prompt's ids (the model's input), every decoder layer's input (row ``l``;
    row 0, "embed", is what enters layer 0, so Gemma's embedding scale and BLOOM's embedding norm are in
    it) and the last layer's output (the final row). So it must be called before this block reads or
    edits anything later than the model's input; to lens a patched run, patch in one
    ``tracer.invoke(prompt)`` and lens in an empty ``tracer.invoke()``, which sees the whole batch after
    every invoke's edits. ``targets`` are single-token strings (encoded by the model's tokenizer) or ids;
    ``token_sets`` maps names to lists of such tokens whose probabilities add up; ``positions`` are prompt
    indices (default all); ``reductions`` names what to compute (``prompt.LENS_REDUCTIONS``): only those
    are computed and downloaded. ``layers`` / ``final_norm`` / ``lm_head`` are module paths for a family
    ``lens_plugins.architectures`` does not know. ``sublayers=True`` puts a row after every attention and
    MLP ("0_attn", "0_mlp", ...; "0_attn+mlp" for parallel blocks), ``sublayers="outputs"`` decodes each
    write alone (``remote_attribution.sublayer_stack``). ``precision`` ("float32", "tf32" on CUDA, "bf16x3")
    says how the server's unembedding matmul runs (``readout.PRECISIONS``); the statistics are float32 either way.
    """
    import nnsight
    from nnsight.intervention.interleaver import OutOfOrderError

    reductions = check_reductions(reductions)
    spec = resolve(model, layers, final_norm, lm_head)
    try:
        token_ids, mask = _prompt(model)
        stack, labels = sublayer_stack(model, spec, sublayers) if sublayers else _residual_stack(model, spec)
    except OutOfOrderError as error:
        raise OutOfOrderError(
            f"{error}: the logit lens reads the model's input and then every layer, so it must come before "
            "anything later in its block. To lens a patched run, patch inside `with tracer.invoke(prompt):` "
            "and call logit_lens(model) inside a separate, empty `with tracer.invoke():` after it"
        ) from error
    decoder = decoder_tensors(model, spec)
    d_vocab = decoder["W_U"].shape[1]
    chosen = resolve_positions(positions, token_ids.shape[1])
    target_ids = [single_token_id(model.tokenizer, t, d_vocab) for t in targets]
    sets = dict(token_sets or {})
    set_ids = [list(dict.fromkeys(single_token_id(model.tokenizer, t, d_vocab) for t in members)) for members in sets.values()]
    user_ids = target_ids + [i for members in set_ids for i in members]
    per_token = target_columns(token_ids.cpu(), mask.cpu(), chosen, reductions, user_ids)
    rows, batch, _, d_model = stack.shape
    flat = stack[:, :, chosen].reshape(rows, batch * len(chosen), d_model)
    with torch.no_grad():
        stats = lens_statistics(
            flat.detach(), **decoder, top_k=top_k, target_ids=per_token,
            vocab_chunk=vocab_chunk, token_chunk=token_chunk, precision=precision,
            reductions=readout_reductions(reductions, len(user_ids)),
        )
    return nnsight.save({
        "format": FORMAT,
        "stats": {name: value.cpu() for name, value in stats.items()},
        "labels": labels,
        "positions": chosen,
        "reductions": list(reductions),
        "token_ids": token_ids.cpu(),
        "attention_mask": mask.cpu(),
        "target_names": [t if isinstance(t, str) else None for t in targets],
        "target_ids": target_ids,
        "set_names": list(sets),
        "set_ids": set_ids,
    })


def _prompt(model):
    """This invoke's ``input_ids`` and ``attention_mask`` (all ones without one), read from the model's
    input; the mask tells left padding from the prompt."""
    args, kwargs = model.inputs
    token_ids = kwargs.get("input_ids", args[0] if args else None)
    if token_ids is None:
        raise ValueError("the lens needs input_ids: trace token ids or text, not inputs_embeds")
    mask = kwargs.get("attention_mask")
    return token_ids, torch.ones_like(token_ids) if mask is None else mask


def _residual_stack(model, spec):
    """``[rows, batch, seq, d_model]``: each layer's input, then the last layer's output; and row labels
    ("embed", "1_pre", ..., "<L-1>_pre", "<L-1>_post") matching the TransformerLens adapter."""
    blocks = get_path(model, spec["layers"])
    n = len(blocks)
    rows = [layer_input(blocks[layer].inputs) for layer in range(n)]
    rows.append(layer_output(blocks[n - 1].output))
    labels = ["embed"] + [f"{layer}_pre" for layer in range(1, n)] + [f"{n - 1}_post"]
    return torch.stack([row.float() for row in rows]), labels


def server_namespace():
    """What ``lens_plugins`` (``lp``) is inside a trace body on an NDIF server: just the in-trace lens
    (``lp.nnsight.logit_lens``), since nothing else of the package can run there."""
    import types

    return types.SimpleNamespace(nnsight=types.SimpleNamespace(logit_lens=logit_lens, attribution=attribution))
