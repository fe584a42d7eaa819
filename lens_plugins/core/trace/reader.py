"""The nnsight reader: rows of a Hugging Face model read inside a trace (row -> a module's input or output).

Called in the body of ``with model.trace(...)`` (or of a ``tracer.invoke``), locally or on an NDIF server, so
this module obeys the server's rules: it imports only torch and core (nnsight, which the server has, inside
functions), reads every tensor from the model's own modules inside the trace, carries no decorators, and
returns plain tensors. Every in-trace method (``core/trace/*``) reads its rows here.

Reading order matters inside a trace: the model's input, then each block in forward order. The reader
reads a row plan (``rows.plan``) in stream order, which is forward order, and reads each module once.
"""

import torch

from lens_plugins.core import dla
from lens_plugins.core import rows as row_plan
from lens_plugins.core.architectures import get_path, is_parallel, layer_input, layer_output
from lens_plugins.core.errors import LensValueError


OUTSIDE_A_TRACE = ("lp.nnsight's in-trace verbs (logit_lens, logit_diff, attribution, attention, ...) read the "
                   "model's activations, so they run inside `with model.trace(prompt):` (or a tracer.invoke); "
                   "outside a trace, use the one-call forms, e.g. lp.nnsight.run_logit_lens(model, prompt), "
                   "which trace for you")


def inputs(model):
    """``(args, kwargs)`` the traced model was called with. Outside a trace nnsight says "Cannot access
    `model.input` outside of interleaving", which names nnsight's internals rather than the fix: say that."""
    try:
        return model.inputs
    except ValueError as error:
        if "outside of interleaving" in str(error):
            raise LensValueError(OUTSIDE_A_TRACE) from None
        raise


def model_input(model):
    """This invoke's ``input_ids`` and ``attention_mask`` (all ones without one), read from the model's
    input; the mask tells left padding from the prompt."""
    args, kwargs = inputs(model)
    token_ids = kwargs.get("input_ids", args[0] if args else None)
    if token_ids is None:
        raise LensValueError("the lens needs input_ids: trace token ids or text, not inputs_embeds")
    mask = kwargs.get("attention_mask")
    return token_ids, torch.ones_like(token_ids) if mask is None else mask


def plan(model, spec, layers, resid_mid, sublayers):
    """``(all rows, chosen rows)`` of this model for a lens call (``rows.plan`` then ``rows.select``)."""
    blocks = get_path(model, spec["layers"])
    every = row_plan.plan(len(blocks), resid_mid, sublayers, is_parallel(model, spec))
    if any(row.site not in ("embed", "pre", "post") for row in every):
        dla.check_sublayer_writes(spec)
    return every, row_plan.select(every, layers)


def reader(model, spec):
    """``read(rows, positions=None) -> [rows, batch, positions or seq, d_model]`` (float32): each row from a
    module's input or output, cut to ``positions`` (a list or a slice of the sequence axis) before it is
    upcast and stacked (a remote server then holds only the positions asked for, not every row of a long
    prompt in float32).

    embed / pre L: block L's input; post / mlp / attn+mlp L: block L's output; mid / attn L: block L's input
    plus what its attention wrote; attn_out / mlp_out L: that write alone.
    """
    blocks = get_path(model, spec["layers"])
    inputs = {}

    def block_input(layer):
        if layer not in inputs:  # a module's input can be read once per forward pass
            inputs[layer] = layer_input(blocks[layer].inputs)
        return inputs[layer]

    def write(layer, role):
        shape = block_input(layer).shape  # read first: the block's input comes before its sublayers' outputs
        module = get_path(blocks[layer], spec.get(f"{role}_out", spec[role]))
        return layer_output(module.output).reshape(shape)

    def read_row(row):
        if row.site in ("embed", "pre"):
            return block_input(row.layer)
        if row.site in ("post", "mlp", "attn+mlp"):
            return layer_output(blocks[row.layer].output)
        if row.site in ("mid", "attn"):
            return block_input(row.layer) + write(row.layer, "attn")
        return write(row.layer, row.site.removesuffix("_out"))

    def read(rows, positions=None):
        values = [read_row(row) if positions is None else read_row(row)[:, positions] for row in rows]
        return torch.stack([v.to(values[0].device).float() for v in values])

    return read


def out_of_order(error):
    """An ``OutOfOrderError`` that says how to call the lens in a patched run."""
    return type(error)(
        f"{error}: the lens reads the model's input and then every layer, so it must come before anything later "
        "in its block. To lens a patched run, patch inside `with tracer.invoke(prompt):` and call the lens "
        "inside a separate, empty `with tracer.invoke():` after it"
    )

__all__ = ["OUTSIDE_A_TRACE", "inputs", "model_input", "plan", "reader", "out_of_order"]
