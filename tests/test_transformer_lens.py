"""The TransformerLens adapter on TransformerBridge caches (raw and compatibility mode)."""

import subprocess
import sys

import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends import transformer_lens as tl_adapter
from tiny_models import random_tokens, tiny_model

PROMPT = "The capital of France is"


def tiny_bridge(family, tokenizer, compatibility_mode=False):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(f"tiny-{family}", hf_model=tiny_model(family), tokenizer=tokenizer)
    bridge.eval()
    if compatibility_mode:
        bridge.enable_compatibility_mode()
    return bridge


def final_hook(model):
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("compatibility_mode", [False, True])
def test_final_row_reproduces_model_log_probs_on_tiny_bridges(family, compatibility_mode, smollm2_tokenizer):
    bridge = tiny_bridge(family, smollm2_tokenizer, compatibility_mode)
    tokens = random_tokens()
    reference = tiny_model(family)(tokens).logits.log_softmax(-1)  # the untouched HF model
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge))
    ours = cache.lens.decoder().logits(cache[final_hook(bridge)]).log_softmax(-1)
    assert (ours - reference).abs().max() <= 1e-4

    result = cache.lens.logit_lens(tokens=tokens, top_k=3)
    p = reference.exp()
    torch.testing.assert_close(result.entropy[-1], -(p * reference).sum(-1), atol=1e-4, rtol=0)
    assert torch.equal(result.top_ids[-1, ..., 0], reference.argmax(-1))
    torch.testing.assert_close(result.top_logprobs[-1], reference.topk(3, dim=-1).values, atol=1e-4, rtol=0)
    next_logprob = reference[:, :-1].gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(result.next_token_logprob[-1, :, :-1], next_logprob, atol=1e-4, rtol=0)
    assert torch.equal(result.kl_final_row[-1], torch.zeros_like(result.kl_final_row[-1]))
    assert (result.final_top1_rank[-1] == 1).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compatibility_mode_does_not_change_the_lens(family, smollm2_tokenizer):
    """Folding norms and centring weights changes the residual stream's parametrisation, not what
    the final norm + unembedding make of it."""
    tokens = random_tokens(seed=4)
    results = []
    for compat in (False, True):
        bridge = tiny_bridge(family, smollm2_tokenizer, compat)
        _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge))
        results.append(cache.lens.logit_lens(tokens=tokens, top_k=3))
    raw, folded = results
    for name in ("top_logprobs", "entropy", "kl_final_row", "kl_row_final", "next_token_logprob"):
        torch.testing.assert_close(getattr(folded, name), getattr(raw, name), atol=1e-4, rtol=1e-4, equal_nan=True)
    assert torch.equal(folded.top_ids, raw.top_ids)


def test_tokens_are_recovered_from_hook_embed(smollm2_tokenizer):
    bridge = tiny_bridge("llama", smollm2_tokenizer)
    tokens = random_tokens(batch=3, seq=5, seed=9)
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter())
    assert torch.equal(tl_adapter.recover_tokens(cache), tokens)
    assert torch.equal(cache.lens.logit_lens().token_ids, tokens)


def test_resid_mid_rows_sit_between_the_pre_rows(smollm2_tokenizer):
    bridge = tiny_bridge("gpt2", smollm2_tokenizer)
    tokens = random_tokens()
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge, resid_mid=True))
    result = cache.lens.logit_lens(tokens=tokens, resid_mid=True)
    assert result.labels == ["embed", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "2_post"]
    stack, _ = cache.lens.stack(resid_mid=True)
    assert torch.equal(stack[1], cache["blocks.0.hook_resid_mid"])


@pytest.fixture(scope="module")
def smollm2_lens(smollm2_bridge):
    bridge = smollm2_bridge
    logits, cache = bridge.run_with_cache(PROMPT, names_filter=lp.transformer_lens.hook_filter())
    return bridge, logits, cache, cache.lens.logit_lens(top_k=5, targets=[" Paris", " London"])


def test_smollm2_final_row_is_the_models_own_prediction(smollm2_lens):
    bridge, logits, cache, result = smollm2_lens
    ours = cache.lens.decoder().logits(cache[final_hook(bridge)]).log_softmax(-1)
    assert (ours - logits.log_softmax(-1)).abs().max() <= 1e-4
    assert result.top_tokens(pos=-1)["29_post"][0][0] == " Paris"
    assert result.labels[0] == "embed" and result.labels[-1] == "29_post" and len(result.labels) == 31


def test_smollm2_rank_of_paris_falls_with_depth(smollm2_lens):
    *_, result = smollm2_lens
    ranks = result.rank_of(" Paris")[:, 0, -1].float()
    assert ranks[-1] == 1
    early, late = ranks[:10].log().mean(), ranks[-10:].log().mean()
    assert late < early - 2  # an e^2 ~ 7x better geometric-mean rank in the last third than the first
    # Overall downward trend: negative rank correlation with depth.
    depth = torch.arange(len(ranks), dtype=torch.float)
    order = ranks.argsort().argsort().float()
    assert torch.corrcoef(torch.stack([depth, order]))[0, 1] < -0.5
    # London is a plausible but losing answer: ranked below Paris at the final row.
    assert result.rank_of(" London")[-1, 0, -1] > 1


def test_hook_filter_caches_only_the_lens_hooks(smollm2_lens):
    *_, cache, _ = smollm2_lens
    assert not any("pattern" in key or "mlp" in key or "attn" in key for key in cache.keys())


# --- bad input ------------------------------------------------------------------------------------


def test_missing_hook_names_the_hook_and_the_fix(smollm2_tokenizer):
    bridge = tiny_bridge("llama", smollm2_tokenizer)
    _, cache = bridge.run_with_cache(random_tokens(), names_filter=lambda name: name.endswith("hook_resid_post"))
    with pytest.raises(KeyError, match=r"blocks\.0\.hook_resid_pre.*hook_filter\(\)"):
        cache.lens.logit_lens()


def test_missing_tokens_and_hook_embed_says_how_to_fix(smollm2_tokenizer):
    bridge = tiny_bridge("llama", smollm2_tokenizer)
    _, cache = bridge.run_with_cache(random_tokens(), names_filter=lambda name: "resid" in name)
    with pytest.raises(KeyError, match="tokens=model.to_tokens"):
        cache.lens.logit_lens()


def test_position_out_of_range_and_multi_token_target(smollm2_tokenizer):
    bridge = tiny_bridge("gpt2", smollm2_tokenizer)
    tokens = random_tokens(seq=6)
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge))
    with pytest.raises(IndexError, match="position 6 is out of range for a prompt of 6 tokens"):
        cache.lens.logit_lens(tokens=tokens, positions=[6])
    with pytest.raises(ValueError, match=r"'Parisienne' is 2 tokens.*tokenises as"):
        cache.lens.logit_lens(tokens=tokens, targets=["Parisienne"])
    result = cache.lens.logit_lens(tokens=tokens, positions=[-1, 0])
    assert result.positions == [0, 5]


def test_empty_prompt_is_refused(smollm2_bridge):
    with pytest.raises(ValueError, match="prompt is empty"):
        lp.transformer_lens.run_logit_lens(smollm2_bridge, "   ")


def test_training_mode_is_refused(smollm2_tokenizer):
    bridge = tiny_bridge("gpt2", smollm2_tokenizer)
    _, cache = bridge.run_with_cache(random_tokens(), names_filter=lp.transformer_lens.hook_filter(bridge))
    bridge.train()
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        cache.lens.logit_lens()


def test_cache_from_a_different_model_is_refused(smollm2_tokenizer):
    gpt2, llama = tiny_bridge("gpt2", smollm2_tokenizer), tiny_bridge("llama", smollm2_tokenizer)
    tokens = random_tokens()
    _, cache = gpt2.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(gpt2))
    cache.model = llama  # same widths, different weights: the embeddings no longer match W_E
    with pytest.raises(ValueError, match="different model"):
        cache.lens.logit_lens()


def test_accessor_appears_without_importing_transformer_lens_first():
    code = (
        "import sys, lens_plugins\n"
        "assert 'transformer_lens' not in sys.modules\n"
        "from transformer_lens import ActivationCache\n"
        "assert hasattr(ActivationCache, 'lens')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_layer_selection_keeps_the_final_reference_and_refuses_out_of_range(smollm2_tokenizer):
    bridge = tiny_bridge("llama", smollm2_tokenizer)
    tokens = random_tokens()
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge))
    full = cache.lens.logit_lens(tokens=tokens)
    some = cache.lens.logit_lens(tokens=tokens, layers=[0, "2_pre"])
    assert some.labels == ["embed", "2_pre", "2_post"]
    torch.testing.assert_close(some.kl_final_row, full.kl_final_row[[0, 2, 3]])
    with pytest.raises(IndexError, match=r"layer 4 is out of range: the stack has rows 0\.\.3 \(embed \.\. 2_post\)"):
        cache.lens.logit_lens(tokens=tokens, layers=[4])
    with pytest.raises(KeyError, match="no row labelled '7_pre'"):
        cache.lens.logit_lens(tokens=tokens, layers=["7_pre"])


def test_nan_in_the_residual_stream_is_refused(smollm2_tokenizer):
    bridge = tiny_bridge("llama", smollm2_tokenizer)
    tokens = random_tokens()
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge))
    cache.cache_dict["blocks.1.hook_resid_pre"][0, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        cache.lens.logit_lens(tokens=tokens)
