"""Attention patterns: TransformerLens and nnsight read the same weights, rows sum to 1, views show them."""

import numpy as np
import pytest
import torch

from lens_plugins.core.trace import attention as core_attention
from lens_plugins.methods import attention
import lens_plugins as lp
from lens_plugins.errors import AttentionUnavailableError
from lens_plugins.plot.attention import head_view, model_view, model_view_grid, sink_figure
from synthetic_results import attention_result
from tiny_models import random_tokens, tiny_model

FAMILIES = ["llama", "gpt2", "gpt_neox", "qwen2"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lens_plugins.models import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def both_backends(family, tokenizer, tokens):
    """Patterns of the same tiny model (same seed: same weights) through a TransformerBridge cache and an
    nnsight trace."""
    from transformer_lens.model_bridge import TransformerBridge

    from lens_plugins.backends.nnsight import wrap_model

    bridge = TransformerBridge.boot_transformers(f"tiny-{family}", hf_model=tiny_model(family), tokenizer=tokenizer).eval()
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.attention_hook_filter(bridge))
    from_tl = lp.transformer_lens.attention(cache, tokens)
    model = wrap_model(tiny_model(family), tokenizer)
    with torch.no_grad(), model.trace(tokens):
        saved = lp.nnsight.attention(model)
    return from_tl, lp.nnsight.attention_result(saved, model)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformer_lens_and_nnsight_agree(family, tokenizer):
    tokens = random_tokens(batch=2, seq=7)
    tl, ns = both_backends(family, tokenizer, tokens)
    assert tl.layers == ns.layers == [0, 1, 2] and tl.patterns.shape == ns.patterns.shape == (3, 2, 4, 7, 7)
    torch.testing.assert_close(tl.patterns, ns.patterns, rtol=1e-5, atol=1e-6)
    for result in (tl, ns):
        torch.testing.assert_close(result.patterns.sum(-1), torch.ones(3, 2, 4, 7), rtol=0, atol=1e-5)
        assert (result.patterns.triu(diagonal=1) == 0).all()  # causal: no query sees a later key
        assert result.str_tokens(1) == [tokenizer.decode([i]) for i in tokens[1].tolist()]


def test_a_layer_subset_and_its_errors(tokenizer):
    tokens = random_tokens(batch=1, seq=5)
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"), tokenizer=tokenizer).eval()
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.attention_hook_filter(bridge, [-1]))
    result = lp.transformer_lens.attention(cache, tokens, layers=[2])
    assert result.layers == [2] and result.head(2, 0).shape == (5, 5)
    with pytest.raises(KeyError, match=r"no 'blocks.0.attn.hook_pattern'.*attention.hook_filter\(model\)"):
        lp.transformer_lens.attention(cache, tokens)
    with pytest.raises(IndexError, match="layer 0 was not read; this result holds layers \\[2\\]"):
        result.head(0, 0)
    with pytest.raises(IndexError, match="head 4 is out of range: layers here have 4 heads"):
        result.head(2, 4)
    with pytest.raises(IndexError, match="layer 3 is out of range for a model of 3 layers"):
        lp.transformer_lens.attention_hook_filter(bridge, [3])


@pytest.fixture
def hf_smollm2(smollm2_hf):
    return smollm2_hf[0]


@pytest.fixture
def sdpa_smollm2(hf_smollm2, smollm2_tokenizer):
    """The session's SmolLM2 (loaded eager) as an sdpa model for one test, then eager again."""
    from lens_plugins.backends.nnsight import wrap_model

    hf_smollm2.config._attn_implementation = "sdpa"
    try:
        yield wrap_model(hf_smollm2, smollm2_tokenizer)
    finally:
        hf_smollm2.config._attn_implementation = "eager"


def test_a_model_loaded_with_sdpa_gives_the_eager_patterns_and_keeps_its_implementation(sdpa_smollm2, hf_smollm2):
    """sdpa forms no attention matrix, and an NDIF server loads models with its own implementation: the trace
    switches to eager for its forward pass. The patterns must equal the eager model's exactly, on a padded
    batch (an explicit mask) and a single prompt (where sdpa needs none), and the model must be sdpa again
    after the trace."""
    from lens_plugins.backends.nnsight import wrap_model

    for prompt in (["The capital of France is", "Hi"], "The capital of France is"):
        got = lp.nnsight.run_attention(sdpa_smollm2, prompt, layers=[0, 29], padding_side="left")
        assert hf_smollm2.config._attn_implementation == "sdpa"
        hf_smollm2.config._attn_implementation = "eager"
        try:
            expected = lp.nnsight.run_attention(wrap_model(hf_smollm2, sdpa_smollm2.tokenizer), prompt,
                                                layers=[0, 29], padding_side="left")
        finally:
            hf_smollm2.config._attn_implementation = "sdpa"
        assert torch.equal(got.patterns, expected.patterns)
        core_attention.check_causal(got.patterns[0], got.attention_mask, 0)  # and causal at every real query


def test_a_switch_after_the_forward_began_is_refused_not_wrong(sdpa_smollm2, hf_smollm2):
    """Read a module first, then ask for attention: the mask was already built for sdpa, so eager attention
    would see no causal mask. That is refused, and the config is restored; and the patterns' own check
    (``check_causal``) refuses weight on a later token at a real query, not at a padding query."""
    with pytest.raises(AttentionUnavailableError, match="inputs were already passed.*first in the trace"):
        with sdpa_smollm2.trace("The capital of France is"):
            sdpa_smollm2.model.layers[0].output.save()
            lp.nnsight.attention(sdpa_smollm2, [1])
    assert hf_smollm2.config._attn_implementation == "sdpa"
    causal = torch.tril(torch.ones(3, 3))
    causal = (causal / causal.sum(-1, keepdim=True)).expand(2, 1, 3, 3).clone()
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    causal[1, 0, 0] = 1 / 3  # a padding query attends everywhere: allowed
    core_attention.check_causal(causal, mask, 0)
    causal[1, 0, 1] = 1 / 3  # a real query reads a later token: refused
    with pytest.raises(AttentionUnavailableError, match="layer 4's attention puts weight on later tokens"):
        core_attention.check_causal(causal, mask, 4)


def test_sink_score_is_the_mean_share_on_the_first_token():
    result = attention_result()
    expected = result.patterns[..., 1:, 0].mean(-1)  # queries after the first, attention on key 0
    torch.testing.assert_close(result.sink_score(), expected)
    frame = result.to_dataframe()
    assert len(frame) == 3 * 2 * 4 and frame["sink_score"].to_numpy() == pytest.approx(expected.flatten().numpy())


def test_sink_score_starts_after_left_padding():
    result = attention_result(batch=1, seq=6)
    result.attention_mask[0, :2] = 0
    result.patterns[..., :2] = 0  # what a padded run gives: no attention on padding keys
    result.patterns = result.patterns / result.patterns.sum(-1, keepdim=True).clamp(min=1e-12)
    torch.testing.assert_close(result.sink_score()[:, 0], result.patterns[:, 0, :, 3:, 2].mean(-1))


def test_model_view_blocks_are_the_patterns():
    result = attention_result()
    grid = model_view_grid(result, batch=1)
    n = 6
    assert grid.shape == (3 * 7 - 1, 4 * 7 - 1)
    for layer in range(3):
        for head in range(4):
            block = grid[layer * 7: layer * 7 + n, head * 7: head * 7 + n]
            assert torch.equal(block.flip(0), result.patterns[layer, 1, head])  # queries down within a block
    assert torch.isnan(grid[6]).all() and torch.isnan(grid[:, 6]).all()  # gutters
    fig = model_view(result, batch=1)
    np.testing.assert_array_equal(np.array(fig.data[0].z, dtype=np.float32), grid.numpy())
    assert list(fig.layout.yaxis.ticktext) == ["L0", "L1", "L2"] and list(fig.layout.xaxis.ticktext) == ["H0", "H1", "H2", "H3"]


def test_head_view_and_sink_figure_show_the_numbers():
    result = attention_result()
    fig = head_view(result, layer=2, head=-1, batch=0)
    np.testing.assert_array_equal(np.array(fig.data[0].z, dtype=np.float32), result.patterns[2, 0, 3].numpy())
    assert fig.layout.xaxis.ticktext[0] == "&lt;script&gt;alert(1)&lt;/script&gt; [0]"
    fig = sink_figure(result, batch=1)
    np.testing.assert_array_equal(np.array(fig.data[0].z, dtype=np.float32), result.sink_score()[:, 1].numpy())


def test_model_view_refuses_a_huge_grid():
    result = attention_result(layers=30, heads=16, seq=100, batch=1)
    with pytest.raises(ValueError, match="read fewer layers"):
        model_view_grid(result)


@pytest.mark.slow
def test_smollm2_backends_agree_and_show_sinks(smollm2_bridge, smollm2_hf):
    """The real model: 30 layers x 9 heads, the same patterns through both backends; most heads of the
    middle layers park most of their attention on the first token (the attention sink)."""
    from lens_plugins.backends.nnsight import wrap_model

    prompt = "The capital of France is"
    tl = lp.transformer_lens.run_attention(smollm2_bridge, prompt, prepend_bos=True)  # to_tokens's ids, traced below
    model = wrap_model(*smollm2_hf)
    tokens = smollm2_bridge.to_tokens(prompt)
    with torch.no_grad(), model.trace(tokens):
        saved = lp.nnsight.attention(model)
    ns = lp.nnsight.attention_result(saved, model)
    torch.testing.assert_close(tl.patterns, ns.patterns, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tl.patterns.sum(-1), torch.ones(tl.patterns.shape[:-1]), rtol=0, atol=1e-5)
    sink = tl.sink_score()[:, 0]
    assert sink.shape == (30, 9) and (sink[5:25] > 0.5).float().mean() > 0.5
