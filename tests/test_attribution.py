"""Direct logit attribution and logit difference, on TransformerBridge caches and inside nnsight traces.

Every exactness check compares against a number computed another way: the untouched Hugging Face model's
own logits, the attention output the model really added, or the other backend.
"""

import pytest
import torch

import lens_plugins as lp
from lens_plugins.core.trace import attribution as trace_attribution, reader as trace_reader
from lens_plugins.backends import nnsight as lpn
from lens_plugins.methods.attribution import result_from_saved
from tiny_models import random_tokens, tiny_model

TOL = 1e-4
TARGET, DISTRACTOR = 17, 42
# LayerNorm + positional embeddings, RMSNorm, sandwich norms + (1 + w) + soft-cap, two parallel-block families
EXACT_FAMILIES = ["gpt2", "llama", "gemma2", "gptj", "gpt_neox"]


def tiny_bridge(family, tokenizer, compatibility_mode=False):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(f"tiny-{family}", hf_model=tiny_model(family), tokenizer=tokenizer).eval()
    if compatibility_mode:
        bridge.enable_compatibility_mode()
    return bridge


def hf_logit_diff(family, tokens, target=TARGET, distractor=DISTRACTOR):
    """The untouched model's own last-position logit difference (soft-capped, as it predicts)."""
    with torch.no_grad():
        logits = tiny_model(family)(tokens).logits[:, -1]
    return logits[:, target] - logits[:, distractor]


def bridge_attribution(family, tokenizer, compatibility_mode, tokens, **kwargs):
    bridge = tiny_bridge(family, tokenizer, compatibility_mode)
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge, attribution=True))
    return cache.lens.attribution(TARGET, DISTRACTOR, by="head", **kwargs)


def nnsight_attribution(family, tokenizer, tokens, target=TARGET, distractor=DISTRACTOR, by="head"):
    model = lpn.wrap_model(tiny_model(family), tokenizer)
    with model.trace(tokens):
        saved = trace_attribution.attribution(model, target, distractor)
    return result_from_saved(saved, tokenizer, by=by)


def assert_exact(dla, reference):
    """Attributions + constant add up to the logit difference, which is the model's own; heads + output
    bias add up to the attention write the model really made."""
    assert dla.error.max() <= TOL, dla.report()
    assert (dla.model_value - reference).abs().max() <= TOL
    assert dla.reconstruction_error.max() <= 1e-5
    assert (dla.heads.sum(-1) + dla.head_bias - dla.attn).abs().max() <= TOL


@pytest.mark.parametrize("family", EXACT_FAMILIES)
@pytest.mark.parametrize("compatibility_mode", [False, True])
def test_bridge_attribution_sums_to_the_models_logit_difference(family, compatibility_mode, smollm2_tokenizer):
    tokens = random_tokens()
    dla = bridge_attribution(family, smollm2_tokenizer, compatibility_mode, tokens)
    assert_exact(dla, hf_logit_diff(family, tokens))
    assert dla.parallel == (family in ("gptj", "gpt_neox"))


@pytest.mark.parametrize("family", EXACT_FAMILIES + ["opt", "gpt_neo", "gemma3_text", "olmo2", "qwen3", "phi3"])
def test_nnsight_attribution_sums_to_the_models_logit_difference(family, smollm2_tokenizer):
    tokens = random_tokens()
    dla = nnsight_attribution(family, smollm2_tokenizer, tokens)
    assert_exact(dla, hf_logit_diff(family, tokens))
    assert dla.parallel == (family in ("gptj", "gpt_neox"))


@pytest.mark.parametrize("family", EXACT_FAMILIES)
def test_transformer_lens_and_nnsight_agree_on_the_same_weights(family, smollm2_tokenizer):
    tokens = random_tokens(seed=3)
    bridge = bridge_attribution(family, smollm2_tokenizer, False, tokens)
    traced = nnsight_attribution(family, smollm2_tokenizer, tokens)
    for name in ("embed", "heads", "head_bias", "attn", "mlp", "constant", "explained"):
        torch.testing.assert_close(getattr(traced, name), getattr(bridge, name), atol=TOL, rtol=0, msg=name)
    assert traced.labels == bridge.labels


def test_views_share_one_total_and_name_their_rows(smollm2_tokenizer):
    dla = nnsight_attribution("gpt2", smollm2_tokenizer, random_tokens())
    totals = [dla.view(by).values.sum(-1) for by in ("component", "layer", "head")]
    torch.testing.assert_close(totals[1], totals[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(totals[2], totals[0], atol=1e-6, rtol=0)
    assert dla.view("component").labels == ["embed", "pos_embed", "0_attn", "0_mlp", "1_attn", "1_mlp", "2_attn", "2_mlp"]
    assert dla.view("layer").labels[2:] == ["layer 0", "layer 1", "layer 2"]
    assert dla.labels[2:8] == ["L0H0", "L0H1", "L0H2", "L0H3", "0_attn_bias", "0_mlp"]
    top = dla.top(3)
    assert [value for _, value in top] == sorted(dla.values[0].tolist(), reverse=True)[:3]


def test_a_token_set_attributes_its_probability_weighted_member_logit(smollm2_tokenizer):
    """Members' weights are their shares of the set's probability under the model's own logits."""
    tokens = random_tokens()
    members = [17, 18, 19]
    dla = nnsight_attribution("llama", smollm2_tokenizer, tokens, target=members, distractor=None)
    with torch.no_grad():
        logits = tiny_model("llama")(tokens).logits[:, -1, members]
    weights = logits.softmax(-1)
    torch.testing.assert_close(dla.member_weights, weights, atol=1e-5, rtol=0)
    torch.testing.assert_close(dla.explained, (weights * logits).sum(-1), atol=TOL, rtol=0)
    assert dla.error.max() <= TOL


def test_logit_diff_final_row_is_the_models_and_token_sets_compare_probabilities(smollm2_tokenizer):
    bridge = tiny_bridge("gemma2", smollm2_tokenizer)
    tokens = random_tokens()
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge))
    diff = cache.lens.logit_diff(TARGET, DISTRACTOR)
    with torch.no_grad():
        logits = tiny_model("gemma2")(tokens).logits
    torch.testing.assert_close(diff.values[-1], logits[..., TARGET] - logits[..., DISTRACTOR], atol=TOL, rtol=0)
    assert diff.values.shape == (len(diff.labels), 2, 7)

    sets = cache.lens.logit_diff([17, 18], [42, 43, 44])
    logprobs = logits.log_softmax(-1)
    expected = logprobs[..., [17, 18]].logsumexp(-1) - logprobs[..., [42, 43, 44]].logsumexp(-1)
    torch.testing.assert_close(sets.values[-1], expected, atol=TOL, rtol=0)


def test_plots_are_a_head_heatmap_and_component_bars(smollm2_tokenizer):
    dla = nnsight_attribution("llama", smollm2_tokenizer, random_tokens())
    heatmap = dla.plot()
    assert heatmap.data[0].type == "heatmap"
    assert torch.tensor(heatmap.data[0].z).shape == (3, 4)
    bars = dla.view("component").plot()
    assert bars.data[0].type == "bar" and list(bars.data[0].x) == dla.view("component").labels


def test_errors_name_the_problem_and_the_fix(smollm2_tokenizer):
    bridge = tiny_bridge("llama", smollm2_tokenizer)
    _, cache = bridge.run_with_cache(random_tokens(), names_filter=lp.transformer_lens.hook_filter(bridge))
    with pytest.raises(KeyError, match=r"hook_filter\(attribution=True\)"):
        cache.lens.attribution(TARGET)
    _, full = bridge.run_with_cache(random_tokens(), names_filter=lp.transformer_lens.hook_filter(bridge, attribution=True))
    with pytest.raises(ValueError, match="is 3 tokens, not one"):
        full.lens.attribution(" Parisianness")
    with pytest.raises(ValueError, match="by='heads'"):
        full.lens.attribution(TARGET, by="heads")
    with pytest.raises(IndexError, match="position 7 is out of range for a prompt of 7 tokens"):
        full.lens.attribution(TARGET, position=7)
    model = lpn.wrap_model(tiny_model("bloom"), smollm2_tokenizer)
    with pytest.raises(NotImplementedError, match="BLOOM"):
        with model.trace(random_tokens()):
            trace_attribution.attribution(model, TARGET)


# --- SmolLM2: the real model -----------------------------------------------------------------------

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2_dla(smollm2_bridge):
    tokens = smollm2_bridge.to_tokens(PROMPT)
    _, cache = smollm2_bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(smollm2_bridge, attribution=True))
    return tokens, cache.lens.attribution(" Paris", " London", by="component")


def logit_diff_with(bridge, tokens, hooks=()):
    paris, london = bridge.to_single_token(" Paris"), bridge.to_single_token(" London")
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=list(hooks))[0, -1]
    return float(logits[paris] - logits[london])


def test_smollm2_attribution_is_exact_and_ablating_the_top_component_lowers_the_difference(smollm2_bridge, smollm2_dla):
    tokens, dla = smollm2_dla
    clean = logit_diff_with(smollm2_bridge, tokens)
    assert dla.error.item() <= TOL
    assert abs(dla.model_value.item() - clean) <= 1e-3
    top = dla.top(5)
    print("top components for ' Paris' - ' London':", top)
    label, value = top[0]
    assert value > 0 and label.endswith(("_attn", "_mlp"))
    layer, kind = label.split("_")
    hook = f"blocks.{layer}.hook_{kind}_out"
    ablated = logit_diff_with(smollm2_bridge, tokens, [(hook, lambda act, hook: torch.zeros_like(act))])
    print(f"logit diff clean {clean:.3f}, with {hook} zeroed {ablated:.3f}")
    assert ablated < clean - 0.5 * value


def test_smollm2_top_head_is_causal_too(smollm2_bridge, smollm2_dla):
    """Per head: zeroing the top head's ``z`` in a rerun lowers the difference by most of its attribution."""
    tokens, dla = smollm2_dla
    heads = dla.view("head")
    label, value = heads.top(1)[0]
    print("top heads:", [item for item in heads.top(8) if item[0].startswith("L")][:5])
    layer, head = (int(x) for x in label[1:].split("H"))

    def zero_head(z, hook):
        z[:, :, head] = 0
        return z

    clean = logit_diff_with(smollm2_bridge, tokens)
    ablated = logit_diff_with(smollm2_bridge, tokens, [(f"blocks.{layer}.attn.hook_z", zero_head)])
    print(f"logit diff clean {clean:.3f}, with head {label} zeroed {ablated:.3f}")
    assert value > 0 and ablated < clean - 0.5 * value


def test_attribution_request_runs_where_lens_plugins_cannot_be_imported(tmp_path, smollm2_tokenizer):
    """The NDIF harness of ``test_remote_serialization``: the trace body is serialised, then run in a process
    that cannot import lens_plugins, jaxtyping or beartype, and must give the local numbers exactly."""
    from lens_plugins.backends.nnsight import attribution
    from test_remote_serialization import SerializeThenRunLocally, run_on_server

    hf = tiny_model("gemma2")  # sandwich norms, (1 + w), soft-cap
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    backend = SerializeThenRunLocally()
    with model.trace("in it is the", backend=backend):
        dla = attribution(model, [" the", " a"], " it")
    embedding = hf.get_input_embeddings().weight
    assert len(backend.blob) < embedding.numel() * embedding.element_size(), "the request must not carry weights"
    first = embedding.detach().reshape(-1)[:16].float()
    assert first.numpy().tobytes() not in backend.blob, "the request carries the embedding"
    served = run_on_server(tmp_path, hf, backend.blob, saved_name="dla")
    for name, value in dla["values"].items():
        torch.testing.assert_close(served["values"][name], value, rtol=0, atol=0, msg=name)
    result = lpn.attribution_result(served, model, by="head")
    assert result.target_names == [" the", " a"] and result.distractor_names == [" it"]
    assert result.error.max() <= TOL


def test_smollm2_nnsight_gives_the_bridges_attribution(smollm2_hf, smollm2_dla):
    tokens, bridge = smollm2_dla  # the bridge's ids, BOS included
    hf, tokenizer = smollm2_hf
    model = lpn.wrap_model(hf, tokenizer)
    with model.trace(tokens):
        saved = trace_attribution.attribution(model, " Paris", " London")
    traced = result_from_saved(saved, tokenizer, by="component")
    assert traced.labels == bridge.labels and traced.error.item() <= TOL
    torch.testing.assert_close(traced.values, bridge.values, atol=1e-3, rtol=0)
    assert "error" in traced.report() and f"{traced.explained.item():.6g}" in traced.report()


def test_hook_filter_predicate_keeps_what_attribution_reads(smollm2_tokenizer):
    """Without a model, ``hook_filter(attribution=True)`` is a predicate; it must keep the positional
    embeddings and every ``hook_z``, or the attribution would differ from the exact list's."""
    bridge = tiny_bridge("gpt2", smollm2_tokenizer)
    tokens = random_tokens()
    results = []
    predicate, exact = lp.transformer_lens.hook_filter(attribution=True), lp.transformer_lens.hook_filter(bridge, attribution=True)
    for names in (predicate, exact):
        _, cache = bridge.run_with_cache(tokens, names_filter=names)
        results.append(cache.lens.attribution(TARGET, DISTRACTOR, by="head"))
    torch.testing.assert_close(results[0].values, results[1].values, atol=0, rtol=0)
    assert results[0].pos_embed is not None and results[0].pos_embed.abs().max() > 0


def test_nnsight_one_call_form_and_the_package_name_in_a_remote_body(tmp_path, smollm2_tokenizer):
    """``lp.nnsight.run_attribution`` locally, and ``lp.nnsight.attribution`` inside a body that ships to a
    server (``lp`` pickles as its server-side namespace)."""
    from test_remote_serialization import SerializeThenRunLocally, run_on_server

    hf = tiny_model("gptj")
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    local = lp.nnsight.run_attribution(model, "in it is the", " the", " a", by="layer")
    assert local.labels == ["embed", "layer 0", "layer 1", "layer 2"] and local.error.item() <= TOL
    backend = SerializeThenRunLocally()
    with model.trace("in it is the", backend=backend):
        dla = lp.nnsight.attribution(model, " the", " a")
    served = lpn.attribution_result(run_on_server(tmp_path, hf, backend.blob, saved_name="dla"), model, by="layer")
    torch.testing.assert_close(served.values, local.values, atol=0, rtol=0)
    assert lpn.attribution_result(dla, model).explained.item() == served.explained.item()
