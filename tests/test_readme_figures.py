"""The SmolLM2 figures the README's quick start and docs/logit_lens.md and docs/attribution.md quote, asserted
where they are properties of the model (issue 18, item 5; the pages since issue 30).

"The capital of France is" on SmolLM2-135M-Instruct in float32, on both backends. What may differ between
CPUs is float32 rounding: another SIMD width or thread count sums the same products in another order. That
moves a logit by a few units in the last place of the partial sums it is made of, about 1e-5 relative over
a 30-layer forward pass; probabilities and attributions of order 1 move by less than 1e-4. So:

- figures the README prints with two decimals (0.75, 3.36, 5.21, 1.54) are asserted to that rounding
  (+-0.005), and each is at least 5e-4 from a rounding boundary, five times the variation above;
- orders are asserted only between values further apart than 0.01 (23_mlp and 29_mlp are 0.005 apart,
  so the README names them as a pair, not in order);
- a rank is asserted inside the interval that float32 rounding allows: tokens whose logits lie within the
  worst-case dot-product rounding bound of the target's may land on either side of it.
"""

import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends import transformer_lens as tl_adapter

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
U = 2.0 ** -24


@pytest.fixture(scope="module")
def lenses(smollm2_bridge, smollm2_hf):
    """The README's TransformerLens call, and the same lens through an nnsight trace of the same ids."""
    _, cache = smollm2_bridge.run_with_cache(PROMPT, names_filter=lp.transformer_lens.hook_filter())
    bridge = cache.lens.logit_lens(top_k=5, targets=[" Paris"])
    hf, tokenizer = smollm2_hf
    model = lpn.wrap_model(hf, tokenizer)
    with model.trace(bridge.token_ids):
        lens = lp.nnsight.logit_lens(model, top_k=5, targets=[" Paris"])
    return {"transformer_lens": (bridge, cache), "nnsight": (lp.nnsight.logit_lens_result(lens, model), cache)}


def rank_interval(resid, decoder, target):
    """``(lowest, highest)`` rank ``target`` can have at ``resid [d_model]`` under float32 rounding: float64
    logits, each with the worst-case bound gamma_{d+4} * (|normed| . |W_U column| + |b_U|)."""
    x = resid.double()
    normed = x * torch.rsqrt(x.pow(2).mean() + decoder.norm_eps) * decoder.norm_weight.double()
    W = decoder.W_U.double()
    logits = normed @ W
    m = decoder.d_model + 4
    slack = m * U / (1 - m * U) * (normed.abs() @ W.abs())
    lo = 1 + int((logits - slack > logits[target] + slack[target]).sum())
    hi = 1 + int((logits + slack > logits[target] - slack[target]).sum()) - 1  # the target itself
    return lo, hi


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_paris_is_the_final_answer_at_0_75(backend, lenses):
    result, _ = lenses[backend]
    top = result.top_tokens(pos=-1)["29_post"]
    assert top[0][0] == " Paris" and abs(top[0][1] - 0.75) <= 0.005, top  # README: (' Paris', 0.75)
    assert top[1][0] == " Mon" and abs(top[1][1] - 0.017) <= 0.0005, top  # README: (' Mon', 0.017)


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_paris_rank_at_the_embeddings_and_from_layer_28_on(backend, lenses, smollm2_bridge):
    result, cache = lenses[backend]
    ranks = result.rank_of(" Paris")[:, 0, -1]
    assert result.labels[-3:] == ["28_pre", "29_pre", "29_post"]
    assert (ranks[-3:] == 1).all() and (ranks[:-3] > 1).all(), ranks.tolist()  # "1 from layer 28 on"
    paris = smollm2_bridge.to_single_token(" Paris")
    lo, hi = rank_interval(cache["blocks.0.hook_resid_pre"][0, -1], tl_adapter.decoder_for(smollm2_bridge), paris)
    assert lo <= int(ranks[0]) <= hi, (int(ranks[0]), lo, hi)
    assert lo <= 4316 <= hi, (lo, hi)  # README: "4316 at the embeddings"


def logit_diff_with(bridge, tokens, hooks=()):
    paris, london = bridge.to_single_token(" Paris"), bridge.to_single_token(" London")
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=list(hooks))[0, -1]
    return float(logits[paris] - logits[london])


def test_top_components_and_the_ablation(smollm2_bridge, smollm2_hf):
    """README: top components ``23_attn`` (+3.36), ``23_mlp`` and ``29_mlp``, ``28_mlp``; zeroing
    ``blocks.23.hook_attn_out`` drops the difference from 5.21 to 1.54, by more than half. Both backends."""
    tokens = smollm2_bridge.to_tokens(PROMPT)
    _, cache = smollm2_bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(smollm2_bridge, attribution=True))
    hf, tokenizer = smollm2_hf
    model = lpn.wrap_model(hf, tokenizer)
    with model.trace(tokens):
        saved = lp.nnsight.attribution(model, " Paris", " London")
    for dla in (cache.lens.attribution(" Paris", " London"), lpn.attribution_result(saved, model)):
        top = dla.top(5)
        labels, values = [label for label, _ in top], [value for _, value in top]
        assert labels[0] == "23_attn" and abs(values[0] - 3.36) <= 0.005, top
        assert set(labels[1:3]) == {"23_mlp", "29_mlp"} and labels[3] == "28_mlp", top
        assert values[0] - values[1] > 0.01 and values[2] - values[3] > 0.01 and values[3] - values[4] > 0.01, top
        assert abs(dla.explained.item() - 5.21) <= 0.005, dla.report()
    clean = logit_diff_with(smollm2_bridge, tokens)
    ablated = logit_diff_with(smollm2_bridge, tokens, [("blocks.23.hook_attn_out", lambda act, hook: torch.zeros_like(act))])
    assert abs(clean - 5.21) <= 0.005 and abs(ablated - 1.54) <= 0.005, (clean, ablated)
    assert ablated < clean / 2
