"""DecoderLens inside an nnsight trace (locally or on an NDIF server): the encoder rows swapped into one batch
of copies, decoded by the decoder and reduced where the model runs (``core.decoder_lens`` explains the batch).
Torch and core only (nnsight inside the function), no decorators, plain containers out: shipped by source.
"""

import torch

from lens_plugins.core.architectures import decoder_tensors, get_path, layer_input, layer_output
from lens_plugins.core.decoder_lens import decoder_lens_stats, encoder_decoder_spec
from lens_plugins.core.defaults import TOP_K
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.reductions import DEFAULT_LENS


def _replace_output(module, new):
    """Swap a layer's residual output for ``new``, keeping the rest of a tuple output (T5's position biases)."""
    output = module.output
    module.output = (new, *output[1:]) if isinstance(output, tuple) else new


def decoder_lens(model, top_k=TOP_K, targets=(), token_sets=None, positions=None, reductions=DEFAULT_LENS,
                 vocab_chunk=None, token_chunk=None):
    """Run the DecoderLens in a trace over ``n_encoder_layers + 1`` identical copies of one example
    (``lp.nnsight.run_decoder_lens`` builds that batch); call it first in the body and label it afterwards
    with ``lp.nnsight.decoder_lens_result(lens, model)``. ``positions`` are decoder positions; the other
    parameters are ``trace.logit_lens``'s."""
    import nnsight

    spec = encoder_decoder_spec(model)
    encoder = get_path(model, spec["encoder_layers"])
    blocks = get_path(model, spec["layers"])
    n = len(encoder)
    args, kwargs = model.inputs
    decoder_ids = kwargs.get("decoder_input_ids")
    if decoder_ids is None:
        raise LensValueError("the DecoderLens needs decoder_input_ids: trace model(input_ids, decoder_input_ids=...)")
    if decoder_ids.shape[0] != n + 1:
        raise LensValueError(f"the DecoderLens runs {n + 1} copies of one example (one per encoder row), got a batch "
                         f"of {decoder_ids.shape[0]}; use lp.nnsight.run_decoder_lens, or repeat the example")
    rows = [layer_input(encoder[layer].inputs) for layer in range(n)]
    rows.append(layer_output(encoder[n - 1].output))
    _replace_output(encoder[n - 1], torch.stack([row[i] for i, row in enumerate(rows)]))
    resid = layer_output(blocks[len(blocks) - 1].output)  # [encoder rows, decoder tokens, d_model]
    own_logits = model.output.logits[n]  # the last copy's logits as the model returns them (BART's bias added)
    with torch.no_grad():
        saved = decoder_lens_stats(resid, decoder_tensors(model, spec), model.tokenizer, decoder_ids, n, top_k,
                                   targets, token_sets, positions, reductions, vocab_chunk, token_chunk,
                                   own_logits=own_logits.detach())
    return nnsight.save(saved)

__all__ = ["decoder_lens"]
