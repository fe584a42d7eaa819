"""DecoderLens on tiny random T5 and BART built offline: the last encoder row is the model's own forward
pass, earlier rows give finite distributions of the right shape, and nnsight agrees with TransformerLens."""

import pytest
import torch
import transformers

from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends import transformer_lens as tl_adapter

ENCODER_IDS = torch.tensor([[5, 17, 300, 42, 7, 99]])
DECODER_IDS = torch.tensor([[0, 55, 66, 77]])
N_ENCODER = 3
CONFIGS = {
    "t5": ("T5Config", dict(d_model=32, d_kv=8, d_ff=64, num_layers=N_ENCODER, num_decoder_layers=2, num_heads=4,
                            decoder_start_token_id=0)),
    # T5 v1.1 / FLAN-T5: untied lm_head, gated-gelu, and no d_model ** -0.5 rescale (transformers 5 keys it on
    # config.scale_decoder_outputs and forces tie_word_embeddings = True)
    "t5v1_1": ("T5Config", dict(d_model=32, d_kv=8, d_ff=64, num_layers=N_ENCODER, num_decoder_layers=2, num_heads=4,
                                decoder_start_token_id=0, tie_word_embeddings=False, feed_forward_proj="gated-gelu")),
    "bart": ("BartConfig", dict(d_model=32, encoder_layers=N_ENCODER, decoder_layers=N_ENCODER,  # TL 4.3 needs BART symmetric
                                encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                max_position_embeddings=64, decoder_start_token_id=0, init_std=0.3)),
}


def tiny_seq2seq(family):
    config_class, kwargs = CONFIGS[family]
    config = getattr(transformers, config_class)(vocab_size=1000, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                                 **kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # random init leaves norms at 1 / 0 and BART's logits bias at 0, which would hide a skip
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.add_(torch.randn_like(model.final_logits_bias))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def lens(family, smollm2_tokenizer):
    model = lpn.wrap_model(tiny_seq2seq(family), smollm2_tokenizer)
    return lpn.run_decoder_lens(model, ENCODER_IDS, DECODER_IDS, top_k=5, targets=[17],
                                reductions=("top_k", "entropy", "kl_final_row", "final_top1", "next_token"))


def test_last_encoder_row_is_the_models_own_output(family, lens):
    hf = tiny_seq2seq(family)
    with torch.no_grad():
        own = torch.log_softmax(hf(input_ids=ENCODER_IDS, decoder_input_ids=DECODER_IDS).logits.float(), -1)[0]
    assert lens.labels == ["embed", "1_pre", "2_pre", "2_post"]
    top_logprobs, top_ids = own.topk(5, -1)
    assert torch.equal(lens.top_ids[-1, 0], top_ids)
    torch.testing.assert_close(lens.top_logprobs[-1, 0], top_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(lens.logprob_of(17)[-1, 0], own[:, 17], atol=1e-5, rtol=0)
    assert (lens.kl_final_row[-1] == 0).all()
    # the next decoder token: DECODER_IDS[1:] scored at positions 0..2, nothing after the last
    torch.testing.assert_close(lens.next_token_logprob[-1, 0, :-1], own[:-1].gather(-1, DECODER_IDS[0, 1:, None])[:, 0],
                               atol=1e-5, rtol=0)


def test_earlier_rows_are_finite_distributions(family, lens):
    rows, batch, positions = len(lens.labels), 1, DECODER_IDS.shape[1]
    assert lens.entropy.shape == (rows, batch, positions) and lens.top_ids.shape == (rows, batch, positions, 5)
    assert torch.isfinite(lens.entropy).all() and torch.isfinite(lens.kl_final_row).all()
    assert (lens.entropy > 0).all() and (lens.entropy <= torch.log(torch.tensor(1000.0)) + 1e-4).all()
    assert (lens.kl_final_row[:-1] > 0).all()  # earlier encoder layers do change the decoder's prediction
    assert torch.isfinite(lens.top_logprobs).all() and (lens.top_logprobs <= 0).all()


def test_nnsight_agrees_with_transformer_lens(family, lens, smollm2_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(f"tiny-{family}", hf_model=tiny_seq2seq(family),
                                                 tokenizer=smollm2_tokenizer).eval()
    theirs = tl_adapter.run_decoder_lens(bridge, ENCODER_IDS, DECODER_IDS, top_k=5, targets=[17],
                                         reductions=("top_k", "entropy", "kl_final_row", "final_top1", "next_token"))
    assert theirs.labels == lens.labels
    for name in ("top_ids", "final_top1", "next_token_rank", "target_ranks"):
        assert torch.equal(getattr(theirs, name), getattr(lens, name)), name
    for name in ("top_logprobs", "entropy", "kl_final_row", "next_token_logprob", "target_logprobs"):
        torch.testing.assert_close(getattr(theirs, name), getattr(lens, name), atol=1e-4, rtol=0, equal_nan=True)


def test_refuses_a_causal_model_and_a_wrong_batch(smollm2_tokenizer, family):
    from tiny_models import tiny_model

    with pytest.raises(ValueError, match="needs an encoder-decoder model"):
        lpn.run_decoder_lens(lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer), ENCODER_IDS, DECODER_IDS)
    model = lpn.wrap_model(tiny_seq2seq(family), smollm2_tokenizer)
    with pytest.raises(ValueError, match=r"runs 4 copies of one example"):
        with model.trace(ENCODER_IDS, decoder_input_ids=DECODER_IDS):
            lpn.decoder_lens(model)


def test_a_batch_or_an_empty_example_is_refused_on_both_backends(smollm2_tokenizer, family):
    """The DecoderLens runs one copy of a single example per encoder row: a batch of two would interleave the
    examples' rows (the TransformerLens form used to return such a mix), so both one-call forms refuse it."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(f"tiny-{family}", hf_model=tiny_seq2seq(family),
                                                 tokenizer=smollm2_tokenizer).eval()
    nn_model = lpn.wrap_model(tiny_seq2seq(family), smollm2_tokenizer)
    for run, model in ((tl_adapter.run_decoder_lens, bridge), (lpn.run_decoder_lens, nn_model)):
        with pytest.raises(ValueError, match=r"input_ids must be one non-empty sequence, shape \[1, seq\], got \(2, "):
            run(model, ENCODER_IDS.repeat(2, 1), DECODER_IDS)
        with pytest.raises(ValueError, match=r"decoder_input_ids must be one non-empty sequence.*got \(1, 0\)"):
            run(model, ENCODER_IDS, DECODER_IDS[:, :0])
        with pytest.raises(ValueError, match="input_ids is empty"):
            run(model, " ", DECODER_IDS)


def test_a_misread_decoder_is_refused_on_every_call(smollm2_tokenizer, monkeypatch):
    """The last copy is the model's own forward pass, so the decoder is checked against the model's own logits
    on every call: the T5 v1.1 rescale read from the wrong config field (as before this check) is refused on
    both backends instead of returning log-probs that are wrong by a factor of sqrt(d_model)."""
    from transformer_lens.model_bridge import TransformerBridge

    from lens_plugins.core import architectures

    wrong = dict(architectures.ENCODER_DECODER["t5"], logit_scale_attr="tie_word_embeddings")
    monkeypatch.setitem(architectures.ENCODER_DECODER, "t5", wrong)
    model = lpn.wrap_model(tiny_seq2seq("t5v1_1"), smollm2_tokenizer)
    with pytest.raises(RuntimeError, match="does not reproduce its own logits"):
        lpn.run_decoder_lens(model, ENCODER_IDS, DECODER_IDS)
    bridge = TransformerBridge.boot_transformers("tiny-t5v1_1", hf_model=tiny_seq2seq("t5v1_1"),
                                                 tokenizer=smollm2_tokenizer).eval()
    with pytest.raises(RuntimeError, match="does not reproduce its own logits"):
        tl_adapter.run_decoder_lens(bridge, ENCODER_IDS, DECODER_IDS)
