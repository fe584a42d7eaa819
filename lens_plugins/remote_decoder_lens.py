"""DecoderLens (Langedijk et al. 2023) inside an nnsight trace: the part that runs where the model runs.

The logit lens of an encoder: hand each encoder layer's output to the decoder as if it were the encoder's
final output, and read what the decoder then predicts. One forward pass does all layers at once: the trace
runs a batch of ``n_encoder_layers + 1`` copies of one (input, decoder input) pair, and at the last encoder
layer's output copy ``i`` is replaced by encoder row ``i`` (row 0: the input of layer 0, the embeddings;
row ``i``: the input of layer ``i``; the last row: the last layer's output, left as it is). The encoder's
own tail (T5's final norm) then runs on every row, so the last copy is the model's own forward pass,
bit for bit. The decoder's last residual of every copy goes through the decoder's final norm and
``lm_head`` in the streamed readout, rows = encoder layers, tokens = decoder positions; only the
reductions come back.

Torch only (nnsight inside the function), plain containers out; shipped by source like ``remote``.
"""

import torch

from lens_plugins.architectures import ENCODER_DECODER, decoder_tensors, get_path, layer_input, layer_output, model_type
from lens_plugins.prompt import (
    DEFAULT_LENS_REDUCTIONS, check_reductions, readout_reductions, resolve_positions, single_token_id, target_columns,
)
from lens_plugins.readout import lens_statistics

FORMAT = "lens_plugins.decoder_lens/1"


def encoder_decoder_spec(model):
    """The ``ENCODER_DECODER`` entry of ``model``, or an error naming the families that have one."""
    kind = model_type(model)
    if kind not in ENCODER_DECODER:
        raise ValueError(f"the DecoderLens needs an encoder-decoder model; {kind!r} is not one lens_plugins knows "
                         f"(known: {sorted(ENCODER_DECODER)}); add an entry to "
                         "lens_plugins.architectures.ENCODER_DECODER")
    return ENCODER_DECODER[kind]


def _replace_output(module, new):
    """Swap a layer's residual output for ``new``, keeping the rest of a tuple output (T5's position biases)."""
    output = module.output
    module.output = (new, *output[1:]) if isinstance(output, tuple) else new


def decoder_lens(model, top_k=10, targets=(), positions=None, reductions=DEFAULT_LENS_REDUCTIONS,
                 vocab_chunk=4096, token_chunk=256):
    """Run the DecoderLens in a trace over ``n_encoder_layers + 1`` identical copies of one example
    (``lp.nnsight.run_decoder_lens`` builds that batch); call it first in the body and label it afterwards
    with ``lp.nnsight.decoder_lens_result(lens, model)``. ``positions`` are decoder positions."""
    import nnsight

    reductions = check_reductions(reductions)
    spec = encoder_decoder_spec(model)
    encoder = get_path(model, spec["encoder_layers"])
    blocks = get_path(model, spec["layers"])
    n = len(encoder)
    args, kwargs = model.inputs
    decoder_ids = kwargs.get("decoder_input_ids")
    if decoder_ids is None:
        raise ValueError("the DecoderLens needs decoder_input_ids: trace model(input_ids, decoder_input_ids=...)")
    if decoder_ids.shape[0] != n + 1:
        raise ValueError(f"the DecoderLens runs {n + 1} copies of one example (one per encoder row), got a batch "
                         f"of {decoder_ids.shape[0]}; use lp.nnsight.run_decoder_lens, or repeat the example")
    rows = [layer_input(encoder[layer].inputs) for layer in range(n)]
    last = layer_output(encoder[n - 1].output)
    rows.append(last)
    _replace_output(encoder[n - 1], torch.stack([row[i] for i, row in enumerate(rows)]))
    resid = layer_output(blocks[len(blocks) - 1].output)  # [encoder rows, decoder tokens, d_model]
    decoder = decoder_tensors(model, spec)
    d_vocab = decoder["W_U"].shape[1]
    token_ids = decoder_ids[:1].cpu()
    chosen = resolve_positions(positions, token_ids.shape[1])
    user_ids = [single_token_id(model.tokenizer, t, d_vocab) for t in targets]
    per_token = target_columns(token_ids, torch.ones_like(token_ids), chosen, reductions, user_ids)
    with torch.no_grad():
        stats = lens_statistics(
            resid[:, chosen].float().detach(), **decoder, top_k=top_k, target_ids=per_token,
            vocab_chunk=vocab_chunk, token_chunk=token_chunk, reductions=readout_reductions(reductions, len(user_ids)),
        )
    return nnsight.save({
        "format": FORMAT,
        "stats": {name: value.cpu() for name, value in stats.items()},
        "labels": ["embed"] + [f"{layer}_pre" for layer in range(1, n)] + [f"{n - 1}_post"],
        "positions": chosen,
        "reductions": list(reductions),
        "token_ids": token_ids,
        "target_names": [t if isinstance(t, str) else None for t in targets],
        "target_ids": user_ids,
    })
