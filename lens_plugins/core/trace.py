"""The lens inside an nnsight trace: the reader that maps rows to a Hugging Face model's modules, and the
in-trace entry points (``logit_lens``, ``logit_diff``, ``attribution``).

These are called in the body of ``with model.trace(...)`` (or of a ``tracer.invoke``). On an NDIF server the
body runs remotely, so this module obeys the server's rules: it imports only torch and core (and nnsight,
which the server has, inside functions), reads every tensor from the model's own modules inside the trace
(``lm_head.weight`` never leaves the server), carries no decorators, and saves only plain dicts, lists and
small tensors (a class of ours would not unpickle on the far side). Type checks and labelling stay on the
caller's machine (``lens_plugins.adapters.nnsight``).

Reading order matters inside a trace: the model's input, then each block in forward order. The reader
reads a row plan (``rows.plan``) in stream order, which is forward order, and reads each module once.
"""

import torch

from lens_plugins.core import dla, pipeline, request, rows as row_plan
from lens_plugins.core.architectures import (
    decoder_tensors, get_path, is_parallel, layer_input, layer_output, norm_params, resolve,
)
from lens_plugins.core.reductions import DEFAULT_LENS

FORMAT = "lens_plugins.nnsight/2"  # marks a saved lens, so the local side can refuse anything else
DIFF_FORMAT = "lens_plugins.logit_diff/1"
ATTRIBUTION_FORMAT = "lens_plugins.attribution/1"


def model_input(model):
    """This invoke's ``input_ids`` and ``attention_mask`` (all ones without one), read from the model's
    input; the mask tells left padding from the prompt."""
    args, kwargs = model.inputs
    token_ids = kwargs.get("input_ids", args[0] if args else None)
    if token_ids is None:
        raise ValueError("the lens needs input_ids: trace token ids or text, not inputs_embeds")
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


def _out_of_order(error):
    """An ``OutOfOrderError`` that says how to call the lens in a patched run."""
    return type(error)(
        f"{error}: the lens reads the model's input and then every layer, so it must come before anything later "
        "in its block. To lens a patched run, patch inside `with tracer.invoke(prompt):` and call the lens "
        "inside a separate, empty `with tracer.invoke():` after it"
    )


def logit_lens(
    model,
    top_k=5,
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
):
    """Run the logit lens on this invoke's rows; call it inside the trace, turn it into a ``LensResult``
    after the trace with ``lp.nnsight.result(lens, model)``. Parameters as the TransformerLens
    ``logit_lens`` (``lens_plugins.adapters.nnsight`` documents them); ``paths`` holds module paths for a
    family ``core.architectures`` does not know; ``lens`` is a lens object (a local trace) or
    ``lp.nnsight.lens_tensors(...)`` (any trace); ``precision`` is how the unembedding matmul runs where the
    model runs ("float32", "tf32" on CUDA, "bf16x3"; ``readout.PRECISIONS``), the statistics being float32."""
    import nnsight
    from nnsight.intervention.interleaver import OutOfOrderError

    spec = resolve(model, paths)
    decoder = decoder_tensors(model, spec)
    every, chosen = plan(model, spec, layers, resid_mid, sublayers)
    try:
        token_ids, mask = model_input(model)
        req = request.build(model.tokenizer, decoder["W_U"].shape[1], token_ids.shape[1], top_k, positions,
                            targets, token_sets, reductions)
        pipeline.check_rows(req, chosen, every)
        stats = pipeline.logit_lens(reader(model, spec), chosen, req, decoder, token_ids.cpu(), mask.cpu(), lens,
                                    vocab_chunk, token_chunk, precision)
    except OutOfOrderError as error:
        raise _out_of_order(error) from error
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
    d_vocab = decoder["W_U"].shape[1]
    target_ids = request.token_set_ids(model.tokenizer, target, d_vocab)
    distractor_ids = request.token_set_ids(model.tokenizer, distractor, d_vocab)
    _, chosen = plan(model, spec, layers, resid_mid, sublayers)
    try:
        token_ids, _ = model_input(model)
        chosen_positions = request.resolve_positions(positions, token_ids.shape[1])
        values = pipeline.logit_diff(reader(model, spec), chosen, chosen_positions, decoder, target_ids,
                                     distractor_ids, token_ids.shape[0], lens)
    except OutOfOrderError as error:
        raise _out_of_order(error) from error
    return nnsight.save({
        "format": DIFF_FORMAT,
        "values": values.detach().cpu(),
        "labels": [row.label for row in chosen],
        "positions": chosen_positions,
        "target_ids": target_ids,
        "distractor_ids": distractor_ids,
    })


def attribution(model, target, distractor=None, position=-1, paths=None):
    """Direct logit attribution at ``position`` of this invoke's prompts, called inside the trace.

    ``target`` / ``distractor`` are single-token strings or ids, or lists of them (token sets, see
    ``dla.member_coefficients``); no distractor attributes the target logit alone. Saves only the attributions
    (``O(layers x heads)`` numbers per prompt): the model's weights and activations stay where the model
    runs. Reads layer 0's input first, so call it before anything later in its block (as ``logit_lens``).
    Turn it into an ``Attribution`` after the trace with ``lp.nnsight.attribution_result(saved, model)``.
    """
    import nnsight
    from nnsight.intervention.interleaver import OutOfOrderError

    spec = resolve(model, paths)
    dla.check_supported(spec)
    decoder = decoder_tensors(model, spec)
    d_vocab = decoder["W_U"].shape[1]
    target_ids = request.token_set_ids(model.tokenizer, target, d_vocab)
    distractor_ids = [] if distractor is None else request.token_set_ids(model.tokenizer, distractor, d_vocab)
    try:
        _, mask = model_input(model)
        dla.check_position(position, mask)
        parts = collect(model, spec, position)
    except OutOfOrderError as error:
        raise _out_of_order(error) from error
    with torch.no_grad():
        out = dla.attribute({k: v.detach() if v is not None else None for k, v in parts.items()}, decoder,
                            target_ids, distractor_ids)
    return nnsight.save({
        "format": ATTRIBUTION_FORMAT,
        "values": {name: value.detach().cpu() for name, value in out.items()},
        "parallel": is_parallel(model, spec),
        "position": position,
        "target_ids": list(target_ids),
        "distractor_ids": list(distractor_ids),
    })


def collect(model, spec, position):
    """Everything the stream holds at ``position``, read inside the trace in forward order: positional
    embeddings, layer 0's input, then per layer the output projection's input (the heads), what attention
    and MLP added, and the last layer's output: the ``parts`` of ``dla.attribute``."""
    blocks = get_path(model, spec["layers"])
    n_heads = dla.head_count(model)
    pos_path = spec.get("pos_embed")
    pos_embed = get_path(model, pos_path).output[:, position].float() if pos_path else None
    embed, heads, head_bias, attn, mlp = None, [], [], [], []
    one_plus = spec.get("norm_one_plus")  # not in the spec: by class name
    for layer in range(len(blocks)):
        block = blocks[layer]
        resid = layer_input(block.inputs)
        if layer == 0:
            embed = resid[:, position].float() if pos_embed is None else resid[:, position].float() - pos_embed
        post_norm = norm_params(get_path(block, spec["attn_out"]), one_plus) if spec.get("post_norms") else None
        o_proj = get_path(block, spec["o_proj"])
        h, b = dla.split_heads(_at(o_proj.input, resid, position), o_proj, n_heads, post_norm)
        heads.append(h)
        head_bias.append(b)
        attn.append(_at(layer_output(get_path(block, spec.get("attn_out", spec["attn"])).output), resid, position))
        mlp.append(_at(layer_output(get_path(block, spec.get("mlp_out", spec["mlp"])).output), resid, position))
    final = layer_output(blocks[len(blocks) - 1].output)[:, position].float()
    return {
        "embed": embed, "pos_embed": pos_embed, "heads": _stack(heads, 1), "head_bias": _stack(head_bias, 1),
        "attn": _stack(attn, 1), "mlp": _stack(mlp, 1), "final": final,
    }


def _stack(tensors, dim):
    """``torch.stack`` of per-layer tensors that may live on different GPUs (a model split across devices)."""
    return torch.stack([t.to(tensors[0].device) for t in tensors], dim)


def _at(x, resid, position):
    """``x`` at ``position``, ``[batch, width]``; OPT flattens ``[batch * seq, d]`` around its MLP, so ``x`` is
    first given the ``[batch, seq]`` lead of the layer's residual input."""
    return x.reshape(*resid.shape[:2], -1)[:, position].float()


def server_namespace():
    """What ``lens_plugins`` (``lp``) is inside a trace body on an NDIF server: just the in-trace entry points
    (``lp.nnsight.logit_lens``, ..., ``lp.nnsight.generation_lens``, ``dola``, ``decoder_lens``), since nothing
    else of the package can run there."""
    import types

    return types.SimpleNamespace(nnsight=types.SimpleNamespace(
        logit_lens=logit_lens, logit_diff=logit_diff, attribution=attribution,
        generation_lens=generation.generation_lens, dola=dola_trace.dola, decoder_lens=decoder_lens.decoder_lens))


# The in-trace entry points of the other methods, for ``server_namespace``. They import this module's reader
# and plan by name, so they are imported here last (a cycle Python resolves either way round). Not the reverse
# (``trace`` as a module there): nnsight pickles a shipped module as a copy of its namespace, and two modules
# naming each other would recurse forever; nor an import inside the function, which would run on the server.
from lens_plugins.core import decoder_lens, dola_trace, generation  # noqa: E402
