"""Structure discovery and verification at first use (issue 28): families out of the table are found from
their module tree and lensed exactly (the in-trace lens's final row against the model's own log-probs, a path
independent of the verification's own decode), a model that does not match is refused by name, and the
verdict is cached per model class."""

import sys
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, random_tokens, tiny_model

from lens_plugins.backends import nnsight as lpn
from lens_plugins.core import architectures, verification

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import architectures_coverage as coverage

TOL = 1e-4

# Families with no table entry, each for a quirk discovery must find: Cohere's logit_scale (a config field
# fitted from the logits), Falcon's parallel attention + MLP, Qwen3-MoE and OLMoE's experts, Granite's
# logits_scaling (a divisor), Phi's parallel block with a LayerNorm and an lm_head bias, Llama 4 (MoE), StableLM,
# Starcoder2 and OLMo's parameter-free LayerNorm.
DISCOVERED = ["cohere", "falcon", "qwen3_moe", "olmoe", "granite", "phi", "llama4_text", "stablelm", "starcoder2",
              "olmo"]


@pytest.fixture(scope="module")
def built():
    return {family: coverage.tiny(family, dict(coverage.families())[family]) for family in DISCOVERED}


@pytest.mark.parametrize("family", DISCOVERED)
def test_a_discovered_family_lenses_to_the_model_s_own_logprobs(family, built, smollm2_tokenizer):
    hf = built[family]
    assert hf.config.model_type not in architectures.ARCHITECTURES
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    tokens = random_tokens(batch=2, seq=6) % hf.config.vocab_size
    with model.trace(tokens):
        lens = lpn.logit_lens(model, top_k=3, sublayers=False)
        logits = model.output.logits.save()
    result = lpn.logit_lens_result(lens, model)
    logp = torch.log_softmax(logits.float(), -1)
    assert torch.equal(result.top_ids[-1, ..., 0], logp.argmax(-1)), family
    assert (result.top_logprobs[-1, ..., 0] - logp.max(-1).values).abs().max() <= TOL, family
    entropy = -(logp.exp() * logp).sum(-1)
    assert (result.entropy[-1] - entropy).abs().max() <= TOL, family


def test_quirks_are_found_by_numbers():
    spec = architectures.resolve(coverage.tiny("cohere", "CohereForCausalLM"))
    cohere = verification.resolve(coverage.tiny("cohere", "CohereForCausalLM"))
    assert spec["discovered"] and cohere["logit_multiplier"] == ("logit_scale", "mul") and cohere["parallel"]
    hf = coverage.tiny("granite", "GraniteForCausalLM")
    hf.config.logits_scaling = 4.0  # the default 1.0 would not show a divisor
    granite = verification.verify(hf, architectures.resolve(hf))
    assert granite["refused"] is None, granite["refused"]
    assert granite["spec"]["logit_multiplier"] == ("logits_scaling", "div") and not granite["spec"]["parallel"]
    hf.config.logits_scaling = 3.0  # the decoder reads the field, as the model's forward does
    logits = hf(torch.arange(3, 9)[None]).logits
    decoder = architectures.decoder_tensors(hf, granite["spec"])
    final = verification.run(hf, granite["spec"])
    torch.testing.assert_close(decoder.unembed(decoder.normalize(final["out"][1])), final["logits"], rtol=1e-4, atol=1e-5)
    assert logits.shape[-1] == decoder.d_vocab


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"opt", "bloom"}))
def test_discovery_finds_what_the_table_names(family):
    """Every table family but OPT (``project_out``) and BLOOM (``adds_residual``), discovered as if unknown,
    reaches the same modules, parallel flag and decoder (Gemma's ``1 + w`` and sandwich norms by numbers)."""
    hf = tiny_model(family)
    table = architectures.resolve(hf)
    verdict = verification.verify(hf, architectures.check_paths(hf, architectures.discovery.discover(hf), {}))
    assert verdict["refused"] is None, verdict["refused"]
    found = verdict["spec"]
    for role in ("layers", "final_norm", "lm_head", "embed"):
        assert architectures.get_path(hf, found[role]) is architectures.get_path(hf, table[role]), role
    block = architectures.get_path(hf, table["layers"])[1]
    for role in ("attn", "mlp", "o_proj", "attn_out", "mlp_out"):
        ours, theirs = found.get(role, found.get(role[:-4])), table.get(role, table.get(role[:-4]))
        assert architectures.get_path(block, ours) is architectures.get_path(block, theirs), role
    assert architectures.is_parallel(hf, found) == architectures.is_parallel(hf, table)
    assert bool(found.get("post_norms")) == bool(table.get("post_norms"))
    ours, theirs = architectures.decoder_tensors(hf, found), architectures.decoder_tensors(hf, table)
    assert ours.norm_kind == theirs.norm_kind and ours.softcap == theirs.softcap
    torch.testing.assert_close(ours.norm_weight, theirs.norm_weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.W_U, theirs.W_U, rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_table_entry_is_verified_unchanged(family):
    hf = tiny_model(family)
    spec = architectures.resolve(hf)
    verdict = verification.verify(hf, spec)
    assert verdict["refused"] is None, verdict["refused"]
    assert verdict["spec"] == dict(spec, **{k: v for k, v in verdict["spec"].items() if k not in spec})
    assert ("sublayers_refused" in verdict["spec"]) is False and ("heads_refused" in verdict["spec"]) is False


def test_a_model_that_does_not_match_is_refused_before_the_lens_runs(smollm2_tokenizer):
    """paths= naming a wrong final norm (a block's norm) decodes the last row wrongly: refused, naming the
    logits mismatch, before any lens runs, and the verdict is cached for the class."""
    hf = tiny_model("llama")
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    paths = {"layers": "model.layers", "final_norm": "model.layers.0.input_layernorm", "lm_head": "lm_head"}
    with pytest.raises(architectures.UnknownArchitectureError, match=r"differs from output_hidden_states\[3\] by"):
        with model.trace(random_tokens(batch=1, seq=4)):
            lpn.logit_lens(model, paths=paths)
    untied = dict(paths, final_norm="model.norm", lm_head="model.embed_tokens")  # a weight of the right shape
    with pytest.raises(architectures.UnknownArchitectureError, match=r"last row decoded .* differs from the model's logits"):
        lpn.decoder_for(hf, untied)
    keys = [key for key in verification.VERDICTS if key[0] is type(hf) and dict(key[1]).get("final_norm") == paths["final_norm"]]
    assert len(keys) == 1 and verification.VERDICTS[keys[0]]["refused"]
    with pytest.raises(architectures.UnknownArchitectureError):
        lpn.decoder_for(hf, paths)


def test_the_verdict_is_computed_once_per_class(monkeypatch):
    hf = tiny_model("qwen2")
    calls = []
    real = verification.verify
    monkeypatch.setattr(verification, "verify", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(verification, "VERDICTS", {})
    for _ in range(3):
        verification.resolve(hf)
    verification.resolve(tiny_model("qwen2", seed=1))
    assert calls == [1]


def test_sublayer_and_head_refusals_reach_the_methods():
    from lens_plugins.core import dla

    with pytest.raises(NotImplementedError, match="sublayer rows .* refused .*: block 3: why"):
        dla.check_sublayer_writes({"sublayers_refused": "block 3: why"})
    with pytest.raises(NotImplementedError, match="by head is refused .*: no heads"):
        dla.check_supported({"heads_refused": "no heads", "o_proj": "x"})
