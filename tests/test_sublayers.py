"""Sublayer rows of the logit lens: the residual after each attention and MLP, or each write alone.

TransformerLens rows come from ``hook_resid_mid`` / ``hook_resid_post`` / ``hook_attn_out`` / ``hook_mlp_out``;
nnsight rows are rebuilt from module outputs inside the trace (``core.trace.reader``). The
two must agree on the same weights, and parallel blocks must not grow an invented ``resid_mid``.
"""

import nnsight
import pytest
import torch

import lens_plugins as lp
from lens_plugins.core import architectures, rows
from lens_plugins.core.trace import reader as trace_reader
from lens_plugins.backends import nnsight as lpn
from tiny_models import random_tokens, tiny_model

TOL = 1e-4


def tiny_bridge(family, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(f"tiny-{family}", hf_model=tiny_model(family), tokenizer=tokenizer).eval()


def bridge_cache(family, tokenizer, sublayers, tokens):
    bridge = tiny_bridge(family, tokenizer)
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge, sublayers=sublayers))
    return cache


def traced_stack(family, tokenizer, sublayers, tokens):
    model = lpn.wrap_model(tiny_model(family), tokenizer)
    with model.trace(tokens):
        spec = architectures.resolve(model)
        plan = rows.plan(len(architectures.get_path(model, spec["layers"])), sublayers=sublayers,
                         parallel=architectures.is_parallel(model, spec))
        stack, labels = trace_reader.reader(model, spec)(plan), [row.label for row in plan]
        saved = nnsight.save((stack.detach(), labels))
    return saved


def test_residual_rows_follow_each_sublayer_and_end_at_the_models_prediction(smollm2_tokenizer):
    tokens = random_tokens()
    cache = bridge_cache("llama", smollm2_tokenizer, True, tokens)
    stack, labels = cache.lens.stack(sublayers=True)
    assert labels == ["embed", "0_attn", "0_mlp", "1_attn", "1_mlp", "2_attn", "2_mlp"]
    assert torch.equal(stack[labels.index("1_attn")], cache["blocks.1.hook_resid_mid"])
    assert torch.equal(stack[labels.index("1_mlp")], cache["blocks.1.hook_resid_post"])
    result = cache.lens.logit_lens(tokens=tokens, sublayers=True, top_k=1)
    with torch.no_grad():
        reference = tiny_model("llama")(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(result.top_logprobs[-1, ..., 0], reference.max(-1).values, atol=TOL, rtol=0)
    assert result.labels == labels


def test_parallel_blocks_have_one_row_per_layer_named_for_both(smollm2_tokenizer):
    cache = bridge_cache("gptj", smollm2_tokenizer, True, random_tokens())
    _, labels = cache.lens.stack(sublayers=True)
    assert labels == ["embed", "0_attn+mlp", "1_attn+mlp", "2_attn+mlp"]
    assert not any(name.endswith("hook_resid_mid") for name in cache.cache_dict)


def test_outputs_rows_decode_each_write_alone_with_the_final_row_as_reference(smollm2_tokenizer):
    tokens = random_tokens()
    cache = bridge_cache("gemma2", smollm2_tokenizer, "outputs", tokens)
    stack, labels = cache.lens.stack(sublayers="outputs")
    assert labels[:3] == ["embed", "0_attn_out", "0_mlp_out"] and labels[-1] == "2_post"
    assert torch.equal(stack[labels.index("2_mlp_out")], cache["blocks.2.hook_mlp_out"])
    result = cache.lens.logit_lens(tokens=tokens, sublayers="outputs", top_k=1)
    assert result.kl_final_row[-1].abs().max() == 0
    assert result.kl_final_row[1].min() > 0  # a lone attention write is not the model's prediction


@pytest.mark.parametrize("family", ["llama", "gemma2", "gptj", "gpt2"])
@pytest.mark.parametrize("sublayers", [True, "outputs"])
def test_nnsight_sublayer_rows_match_transformer_lens(family, sublayers, smollm2_tokenizer):
    tokens = random_tokens(seed=5)
    stack, labels = bridge_cache(family, smollm2_tokenizer, sublayers, tokens).lens.stack(sublayers=sublayers)
    traced, traced_labels = traced_stack(family, smollm2_tokenizer, sublayers, tokens)
    assert traced_labels == labels
    torch.testing.assert_close(traced, stack.float(), atol=TOL, rtol=0)


def test_bad_sublayers_value_and_missing_hooks_say_what_to_pass(smollm2_tokenizer):
    cache = bridge_cache("llama", smollm2_tokenizer, False, random_tokens())
    with pytest.raises(KeyError, match=r"hook_filter\(sublayers=True\)"):
        cache.lens.logit_lens(sublayers=True)
    with pytest.raises(ValueError, match="pass True .* or 'outputs'"):
        cache.lens.stack(sublayers="heads")


def test_token_set_trajectory_over_sublayer_rows_ends_at_the_models_set_probability(smollm2_tokenizer):
    """The latent-language plot's data: a token set's probability at every sublayer row."""
    tokens = random_tokens()
    cache = bridge_cache("llama", smollm2_tokenizer, True, tokens)
    result = cache.lens.logit_lens(tokens=tokens, sublayers=True, token_sets={"set": [17, 18, 19]}, top_k=1)
    with torch.no_grad():
        logprobs = tiny_model("llama")(tokens).logits.log_softmax(-1)
    assert result.set_logprobs.shape == (7, 2, 7, 1)
    torch.testing.assert_close(result.set_logprobs[-1, ..., 0], logprobs[..., [17, 18, 19]].logsumexp(-1), atol=TOL, rtol=0)


def test_run_logit_lens_caches_the_sublayer_hooks_itself(smollm2_bridge):
    result = lp.transformer_lens.run_logit_lens(smollm2_bridge, "The capital of France is", sublayers=True, top_k=1)
    assert len(result.labels) == 1 + 2 * 30 and result.labels[-2:] == ["29_attn", "29_mlp"]
    paris = smollm2_bridge.to_single_token(" Paris")
    assert result.top_ids[-1, 0, -1, 0] == paris


@pytest.mark.parametrize("family", ["llama", "gptj"])
@pytest.mark.parametrize("sublayers", [True, "outputs"])
def test_nnsight_logit_lens_with_sublayers_matches_transformer_lens(family, sublayers, smollm2_tokenizer):
    tokens = random_tokens(seed=6)
    expected = bridge_cache(family, smollm2_tokenizer, sublayers, tokens).lens.logit_lens(tokens=tokens, sublayers=sublayers, top_k=3)
    model = lpn.wrap_model(tiny_model(family), smollm2_tokenizer)
    with model.trace(tokens):
        lens = lpn.logit_lens(model, top_k=3, sublayers=sublayers)
    result = lpn.logit_lens_result(lens, model)
    assert result.labels == expected.labels
    torch.testing.assert_close(result.top_logprobs, expected.top_logprobs, atol=TOL, rtol=0)
    torch.testing.assert_close(result.kl_final_row, expected.kl_final_row, atol=TOL, rtol=0)
