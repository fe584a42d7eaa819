"""DecoderLens (Langedijk et al. 2023): the arithmetic both backends share (the in-trace half is
``core/trace/decoder_lens.py``).

The logit lens of an encoder: hand each encoder layer's output to the decoder as if it were the encoder's
final output, and read what the decoder then predicts. One forward pass does all layers at once: the trace
runs a batch of ``n_encoder_layers + 1`` copies of one (input, decoder input) pair, and at the last encoder
layer's output copy ``i`` is replaced by encoder row ``i`` (the rows of ``rows.plan(n_encoder_layers)``:
row 0 the input of layer 0, the embeddings; row ``i`` the input of layer ``i``; the last row the last
layer's output, left as it is). The encoder's own tail (T5's final norm) then runs on every row, so the last
copy is the model's own forward pass, bit for bit. The decoder's last residual of every copy is the "row"
the one lens pipeline decodes (``pipeline.logit_lens``: request, checks, the decoder's final norm and
``lm_head`` in the streamed readout), rows = encoder rows, tokens = decoder positions; only the reductions
come back. ``decoder_lens_stats`` is that last step, shared with the TransformerLens adapter, which runs the
same batch with hooks.

Torch and core only (nnsight inside the function), no decorators, plain containers out: shipped by source.
"""

import torch

from lens_plugins.core import pipeline, request
from lens_plugins.core import rows as row_plan
from lens_plugins.core.architectures import ENCODER_DECODER, model_type
from lens_plugins.core.errors import LensRuntimeError, LensValueError

FORMAT = "lens_plugins.decoder_lens/2"


def encoder_decoder_spec(model):
    """The ``ENCODER_DECODER`` entry of ``model``, or an error naming the families that have one."""
    kind = model_type(model)
    if kind not in ENCODER_DECODER:
        raise LensValueError(f"the DecoderLens needs an encoder-decoder model; {kind!r} is not one lens_plugins knows "
                         f"(known: {sorted(ENCODER_DECODER)}); add an entry to "
                         "lens_plugins.core.architectures.ENCODER_DECODER")
    return ENCODER_DECODER[kind]


def one_example(tokenizer, value, name):
    """``value`` (text, or token ids ``[1, seq]``) as the one example's ids ``[1, seq]``: the DecoderLens runs
    one copy of a single example per encoder row, so a batch or an empty sequence is refused, on either
    backend, before anything runs."""
    if isinstance(value, str):
        if not value.strip():
            raise LensValueError(f"{name} is empty ({value!r}): give the model some text")
        return tokenizer(value, return_tensors="pt")["input_ids"]
    if value.dim() != 2 or value.shape[0] != 1 or value.shape[1] == 0:
        raise LensValueError(f"{name} must be one non-empty sequence, shape [1, seq], got {tuple(value.shape)}")
    return value.long()


def check_own_output(final_resid, decoder, own_logits):
    """Refuse a decoder that does not reproduce the model's own logits on the last copy (the model's own
    forward pass): ``final_resid [decoder tokens, d_model]`` decoded here against ``own_logits [decoder tokens,
    vocab]`` from ``lm_head``. A family quirk read wrongly (a rescale, a bias, a soft-cap) changes every
    log-prob while keeping most top ids, so it is checked on every call, not only in tests. The tolerance
    (1% of the logits' range, plus 1e-3) is far above float rounding in the model's dtype and far below what a
    missed quirk does (T5's ``d_model ** -0.5`` changes logits by a factor of 16 or more)."""
    ours = decoder.unembed(decoder.normalize(final_resid.to(decoder.W_U.device))).float()
    own = own_logits.to(ours.device).float()
    gap = float((ours - own).abs().max())
    if gap > 0.01 * float(own.abs().max()) + 1e-3:
        raise LensRuntimeError(
            f"the decoder lens_plugins read from this model does not reproduce its own logits (largest gap {gap:.3g} "
            f"on logits up to {float(own.abs().max()):.3g}): a quirk of this family (an output rescale, a logits "
            "bias, a soft-cap) is read wrongly, so every row would be wrong. Please report it with the model's "
            "config; lens_plugins.core.architectures.ENCODER_DECODER holds the family's entry")


def decoder_lens_stats(resid, decoder, tokenizer, decoder_ids, n_encoder_layers, top_k, targets, token_sets,
                       positions, reductions, vocab_chunk=None, token_chunk=None, own_logits=None):
    """The saved DecoderLens of the decoder's last residual ``resid [encoder rows, decoder tokens, d_model]``
    (copy ``i`` ran on encoder row ``i``) and the example's ``decoder_ids [1, decoder tokens]``: a plain
    dict in the saved-lens layout (``stats``, ``labels``, ``request``, ``token_ids``, ``attention_mask``).
    ``own_logits`` (the model's logits on the last copy) are checked against the decoder (``check_own_output``)."""
    rows = row_plan.plan(n_encoder_layers)
    if resid.shape[0] != len(rows):
        raise LensValueError(f"the DecoderLens runs {len(rows)} copies of one example (one per encoder row), got a "
                         f"batch of {resid.shape[0]}; use run_decoder_lens, or repeat the example")
    if own_logits is not None:
        check_own_output(resid[-1], decoder, own_logits)
    token_ids = decoder_ids[:1].cpu().long()
    mask = torch.ones_like(token_ids)
    req = request.build(tokenizer, decoder.d_vocab, token_ids.shape[1], top_k, positions, targets,
                        token_sets, reductions)
    stack = resid.detach().float()[:, None]  # [rows, batch 1, decoder tokens, d_model]
    stats = pipeline.logit_lens(lambda chosen, positions: stack[:, :, positions], rows, req, decoder, token_ids,
                                mask, None, vocab_chunk, token_chunk)
    return {
        "format": FORMAT,
        "stats": {name: value.cpu() for name, value in stats.items()},
        "labels": [row.label for row in rows],
        "request": req,
        "token_ids": token_ids,
        "attention_mask": mask,
    }

__all__ = ["FORMAT", "encoder_decoder_spec", "one_example", "check_own_output", "decoder_lens_stats"]
