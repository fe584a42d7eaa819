"""HookedTransformer (TransformerLens 3.9) built offline from Hugging Face models, and the lens on its caches."""

import warnings

import pytest
import torch
import transformers

import lens_plugins as lp
from export_lens import prompt_tokens
from lens_plugins.backends import transformer_lens as tl_adapter
from lens_plugins.models.hooked_transformer import SUPPORTED_ARCHITECTURES, hooked_transformer_from_hf
from tiny_models import VOCAB, random_tokens, tiny_model

TOL = 1e-4


def max_diff(a, b):
    return (a - b).abs().max().item()


def build(hf_model, tokenizer, **flags):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return hooked_transformer_from_hf(hf_model, tokenizer, **flags)


def smollm2_batch(tokenizer):
    """The fixed prompt (with BOS) and a second row of ordinary ids, so batching is exercised too."""
    prompt = prompt_tokens(tokenizer)
    other = torch.randint(2, tokenizer.vocab_size, prompt.shape, generator=torch.Generator().manual_seed(3))
    other[:, 0] = tokenizer.bos_token_id
    return torch.cat([prompt, other])


def check_final_row(cache, tokens, reference, top_k=5):
    """The lens's last row must be the model's own next-token distribution ``reference``."""
    final = f"blocks.{cache.model.cfg.n_layers - 1}.hook_resid_post"
    ours = cache.lens.decoder().logits(cache[final]).log_softmax(-1)
    diff = max_diff(ours, reference)
    assert diff <= TOL, f"decoder(final residual) differs from the model's log-probs by {diff:.3g}"

    result = cache.lens.logit_lens(tokens=tokens, top_k=top_k)
    assert result.labels[-1] == f"{cache.model.cfg.n_layers - 1}_post"
    top = reference.topk(top_k, dim=-1)
    assert torch.equal(result.top_ids[-1], top.indices)
    torch.testing.assert_close(result.top_logprobs[-1], top.values, atol=TOL, rtol=0)
    torch.testing.assert_close(result.entropy[-1], -(reference.exp() * reference).sum(-1), atol=TOL, rtol=0)
    next_logprob = reference[:, :-1].gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(result.next_token_logprob[-1, :, :-1], next_logprob, atol=TOL, rtol=0)
    assert torch.isnan(result.next_token_logprob[-1, :, -1]).all()
    assert torch.equal(result.kl_final_row[-1], torch.zeros_like(result.kl_final_row[-1]))
    assert (result.final_top1_rank[-1] == 1).all()
    return result


# --- SmolLM2 -------------------------------------------------------------------------------------


def test_config_follows_the_hf_config(smollm2_hf, smollm2_ht):
    hf_cfg, cfg = smollm2_hf[0].config, smollm2_ht.cfg
    assert cfg.original_architecture == "LlamaForCausalLM"
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.d_vocab) == (
        hf_cfg.num_hidden_layers, hf_cfg.hidden_size, hf_cfg.num_attention_heads, hf_cfg.intermediate_size, hf_cfg.vocab_size)
    assert cfg.d_head * cfg.n_heads == hf_cfg.hidden_size
    assert cfg.n_key_value_heads == hf_cfg.num_key_value_heads != hf_cfg.num_attention_heads  # grouped-query
    assert cfg.rotary_base == hf_cfg.rope_parameters["rope_theta"]
    assert cfg.rotary_dim == cfg.d_head and not cfg.rotary_adjacent_pairs
    assert cfg.eps == hf_cfg.rms_norm_eps and cfg.final_rms and cfg.gated_mlp and cfg.act_fn == hf_cfg.hidden_act
    assert cfg.normalization_type == "RMSPre"  # folded


def test_smollm2_logits_match_hf(smollm2_hf, smollm2_hooked):
    name, model = smollm2_hooked
    hf_model, tokenizer = smollm2_hf
    tokens = smollm2_batch(tokenizer)
    with torch.no_grad():
        reference = hf_model(tokens).logits.log_softmax(-1)
        ours = model(tokens).log_softmax(-1)
    diff = max_diff(ours, reference)
    assert diff <= TOL, f"{name}: HookedTransformer log-probs differ from Hugging Face's by {diff:.3g}"


def test_smollm2_to_tokens_prepends_the_same_bos(smollm2_hf, smollm2_ht):
    from export_lens import PROMPT

    assert torch.equal(smollm2_ht.to_tokens(PROMPT).cpu(), prompt_tokens(smollm2_hf[1]))


def test_smollm2_lens_final_row_reproduces_the_model(smollm2_hf, smollm2_hooked):
    name, model = smollm2_hooked
    hf_model, tokenizer = smollm2_hf
    tokens = smollm2_batch(tokenizer)
    with torch.no_grad():
        reference = hf_model(tokens).logits.log_softmax(-1)
        _, cache = model.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(model))
    result = check_final_row(cache, tokens, reference)
    assert len(result.labels) == model.cfg.n_layers + 1
    # The cache alone is enough: tokens come back from hook_embed.
    assert torch.equal(tl_adapter.recover_tokens(cache), tokens)


def test_smollm2_decoder_reads_folded_and_unfolded_norms(smollm2_hf, smollm2_ht, smollm2_ht_unprocessed):
    norm = smollm2_hf[0].model.norm
    folded, raw = tl_adapter.decoder_for(smollm2_ht), tl_adapter.decoder_for(smollm2_ht_unprocessed)
    assert folded.norm_kind == raw.norm_kind == "rmsnorm"
    assert folded.norm_weight is None  # folded into W_U
    assert torch.equal(raw.norm_weight, norm.weight.detach())
    assert folded.norm_eps == raw.norm_eps == norm.variance_epsilon
    # center_unembed: every column mean of W_U is zero in the processed model only.
    assert folded.W_U.mean(-1).abs().max() <= 1e-6 < raw.W_U.mean(-1).abs().max()


def test_weight_processing_does_not_change_the_lens(smollm2_hf, smollm2_ht, smollm2_ht_unprocessed):
    """fold_ln and center_unembed reparametrise W_U; no lens row may move."""
    tokens = prompt_tokens(smollm2_hf[1])
    results = []
    for model in (smollm2_ht_unprocessed, smollm2_ht):
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(model, resid_mid=True))
        results.append(cache.lens.logit_lens(tokens=tokens, resid_mid=True, top_k=5))
    raw, processed = results
    assert raw.labels == processed.labels and "0_mid" in raw.labels
    assert torch.equal(processed.top_ids, raw.top_ids)
    for field in ("top_logprobs", "entropy", "kl_final_row", "kl_row_final", "next_token_logprob"):
        torch.testing.assert_close(getattr(processed, field), getattr(raw, field), atol=TOL, rtol=1e-5, equal_nan=True)


def test_run_logit_lens_one_call(smollm2_ht, smollm2_hf):
    """The one-call form runs the prompt as the model's own tokenizer does (``prepend_bos=None``), and with
    ``prepend_bos=True`` as HookedTransformer's ``to_tokens`` does (BOS first)."""
    from export_lens import PROMPT

    result = lp.transformer_lens.run_logit_lens(smollm2_ht, PROMPT, top_k=3)
    assert result.token_ids[0].tolist() == smollm2_hf[1](PROMPT)["input_ids"]
    assert result.top_ids.shape == (smollm2_ht.cfg.n_layers + 1, 1, result.token_ids.shape[1], 3)
    with_bos = lp.transformer_lens.run_logit_lens(smollm2_ht, PROMPT, top_k=3, prepend_bos=True)
    assert torch.equal(with_bos.token_ids, smollm2_ht.to_tokens(PROMPT).cpu())


# --- tiny random models --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("fold_ln", [True, False])
@pytest.mark.parametrize("center_unembed", [True, False])
def test_tiny_models_match_hf_and_the_lens_reproduces_them(family, fold_ln, center_unembed, smollm2_tokenizer):
    hf_model = tiny_model(family, optional_biases=False)
    model = build(hf_model, smollm2_tokenizer, fold_ln=fold_ln, center_writing_weights=fold_ln, center_unembed=center_unembed)
    assert model.cfg.original_architecture == type(hf_model).__name__
    expected_norm = {"gpt2": "LN", "llama": "RMS"}[family] + ("Pre" if fold_ln else "")
    assert model.cfg.normalization_type == expected_norm
    tokens = random_tokens()
    with torch.no_grad():
        reference = hf_model(tokens).logits.log_softmax(-1)
        logits, cache = model.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(model))
    diff = max_diff(logits.log_softmax(-1), reference)
    assert diff <= TOL, f"HookedTransformer log-probs differ from Hugging Face's by {diff:.3g}"
    check_final_row(cache, tokens, reference, top_k=3)
    assert torch.equal(cache.lens.logit_lens().token_ids, tokens)  # recovered from hook_embed


def test_tiny_gpt2_decoder_keeps_ln_final_bias(smollm2_tokenizer):
    """Unfolded GPT-2: the decoder applies ln_final's weight and bias; folded, they live in W_U and b_U."""
    hf_model = tiny_model("gpt2", optional_biases=False)
    raw = tl_adapter.decoder_for(build(hf_model, smollm2_tokenizer, fold_ln=False, center_writing_weights=False, center_unembed=False))
    folded = tl_adapter.decoder_for(build(hf_model, smollm2_tokenizer))
    ln_f = hf_model.transformer.ln_f
    assert raw.norm_kind == folded.norm_kind == "layernorm"
    assert torch.equal(raw.norm_weight, ln_f.weight.detach()) and torch.equal(raw.norm_bias, ln_f.bias.detach())
    assert folded.norm_weight is None and folded.norm_bias is None
    assert folded.b_U is not None and folded.b_U.abs().max() > 0  # ln_f.bias @ W_U, folded


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_conversion_leaves_the_hf_model_untouched(family, smollm2_tokenizer):
    """TransformerLens centres and folds weights in place; the conversion must work on copies."""
    hf_model = tiny_model(family, optional_biases=False)
    before = {name: p.detach().clone() for name, p in hf_model.named_parameters()}
    build(hf_model, smollm2_tokenizer, fold_ln=True, center_writing_weights=True, center_unembed=True)
    for name, p in hf_model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed"


def test_unsupported_family_names_the_supported_ones(smollm2_tokenizer):
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)
    model = transformers.MistralForCausalLM(config).eval()
    with pytest.raises(NotImplementedError) as error:
        build(model, smollm2_tokenizer)
    message = str(error.value)
    assert "MistralForCausalLM" in message
    assert all(name in message for name in SUPPORTED_ARCHITECTURES)


def test_biased_llama_is_refused_not_silently_wrong(smollm2_tokenizer):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, attention_bias=True)
    with pytest.raises(NotImplementedError, match="attention_bias"):
        build(transformers.LlamaForCausalLM(config).eval(), smollm2_tokenizer)
