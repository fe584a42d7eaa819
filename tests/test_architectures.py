"""Every family of the architecture table, on a tiny random model built offline: the lens's final row
must decode to exactly the model's own distribution, through the in-trace nnsight lens."""

import math

import pytest
import torch

from lens_plugins.core import architectures
from lens_plugins.backends import nnsight as lpn
from tiny_models import FAMILIES, random_tokens, tiny_model

TOL = 1e-4


def test_every_table_family_has_a_tiny_model():
    assert set(architectures.ARCHITECTURES) == set(FAMILIES)


def _trace(model, tokens, **paths):
    with model.trace(tokens):
        lens = lpn.logit_lens(model, top_k=3, **paths)
        final = architectures.layer_output(architectures.get_path(model, paths.get("paths", {}).get("layers") or
                                           architectures.resolve(model)["layers"])[-1].output).save()
        logits = model.output.logits.save()
    return lens, final, logits


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(request, smollm2_tokenizer):
    hf = tiny_model(request.param)
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    tokens = random_tokens(batch=2, seq=6)
    lens, final, logits = _trace(model, tokens)
    return request.param, hf, model, tokens, lens, final, logits


def test_final_row_reproduces_model_logprobs(family_run):
    family, hf, _, _, _, final, logits = family_run
    decoder = lpn.decoder_for(hf)
    ours = torch.log_softmax(decoder.logits(final), -1)
    theirs = torch.log_softmax(logits.float(), -1)
    assert (ours - theirs).abs().max() <= TOL, family


def test_final_row_statistics_match_model(family_run, smollm2_tokenizer):
    family, hf, model, tokens, lens, _, logits = family_run
    result = lpn.logit_lens_result(lens, model)
    logp = torch.log_softmax(logits.float(), -1)
    assert torch.equal(result.top_ids[-1, ..., 0], logp.argmax(-1)), family
    assert torch.equal(result.final_top1, logp.argmax(-1)), family
    entropy = -(logp.exp() * logp).sum(-1)
    assert (result.entropy[-1] - entropy).abs().max() <= TOL, family
    assert (result.top_logprobs[-1, ..., 0] - logp.max(-1).values).abs().max() <= TOL, family
    assert result.kl_final_row[-1].abs().max() <= TOL
    next_lp = logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    assert (result.next_token_logprob[-1, :, :-1] - next_lp).abs().max() <= TOL, family
    n_layers = len(architectures.get_path(hf, architectures.ARCHITECTURES[family]["layers"]))
    assert result.labels == ["embed"] + [f"{i}_pre" for i in range(1, n_layers)] + [f"{n_layers - 1}_post"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_component_resolves(family):
    hf = tiny_model(family)
    spec = architectures.resolve(hf)
    for role in architectures.ROLES:
        assert isinstance(architectures.component(hf, spec, role, layer=0), torch.nn.Module), (family, role)


def test_gemma_embed_row_is_scaled_embedding(smollm2_tokenizer):
    hf = tiny_model("gemma")
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    tokens = random_tokens(batch=1, seq=5)
    with model.trace(tokens):
        lens = lpn.logit_lens(model, top_k=1)
    scaled = hf.model.embed_tokens(tokens) * math.sqrt(hf.config.hidden_size)
    expected = lpn.decoder_for(hf).logits(scaled).argmax(-1)
    assert torch.equal(lens["stats"]["top_ids"][0, :, 0], expected.reshape(-1))


def test_quirks_reach_the_decoder():
    assert lpn.decoder_for(tiny_model("gemma2")).softcap == 3.0
    gemma = tiny_model("gemma")
    assert torch.allclose(lpn.decoder_for(gemma).norm_weight, 1 + gemma.model.norm.weight)
    opt = tiny_model("opt")
    assert opt.model.decoder.project_out is not None
    assert lpn.decoder_for(opt).W_U.shape == (opt.config.hidden_size, opt.config.vocab_size)
    assert lpn.decoder_for(tiny_model("gptj")).b_U is not None


def test_transformers_4_tuple_outputs():
    hidden = torch.randn(1, 2, 3)
    assert architectures.layer_output((hidden, None)) is hidden
    assert architectures.layer_output(hidden) is hidden
    assert architectures.layer_input(((), {"hidden_states": hidden})) is hidden


def test_a_family_out_of_the_table_is_discovered_and_paths_by_hand_agree(monkeypatch, smollm2_tokenizer):
    """Without its table entry, Llama is found from its module tree (``core.discovery``) and verified; the
    lens is identical to the table's and to paths given by hand. A model with no block list is refused by
    name, with the ``paths=`` remedy."""
    hf = tiny_model("llama")
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    tokens = random_tokens(batch=1, seq=5)
    known, _, _ = _trace(model, tokens)
    monkeypatch.delitem(architectures.ARCHITECTURES, "llama")
    spec = architectures.resolve(hf)
    assert spec["discovered"] and (spec["layers"], spec["final_norm"], spec["lm_head"]) == (
        "model.layers", "model.norm", "lm_head")
    discovered, _, _ = _trace(model, tokens)
    by_hand, _, _ = _trace(model, tokens, paths={"layers": "model.layers", "final_norm": "model.norm", "lm_head": "lm_head"})
    for name, value in known["stats"].items():
        torch.testing.assert_close(value, by_hand["stats"][name], rtol=0, atol=0, equal_nan=True, msg=name)
        torch.testing.assert_close(value, discovered["stats"][name], rtol=0, atol=0, equal_nan=True, msg=name)
    flat = torch.nn.Sequential(torch.nn.Linear(4, 4))
    flat.config = hf.config
    with pytest.raises(architectures.UnknownArchitectureError, match=r"could not find the layers.*paths="):
        architectures.resolve(flat)


def test_wrong_path_names_the_path():
    with pytest.raises(AttributeError, match="'model.blocks'"):
        architectures.get_path(tiny_model("llama"), "model.blocks")


def test_a_misspelled_final_norm_path_is_refused_not_dropped():
    """A final norm named by hand must exist: a decoder built without it would decode every row wrongly
    (``final_norm=""`` is how a model without one says so)."""
    hf = tiny_model("llama")
    paths = {"layers": "model.layers", "final_norm": "model.nrom", "lm_head": "lm_head"}
    with pytest.raises(AttributeError, match="'model.nrom'"):
        architectures.decoder_tensors(hf, architectures.resolve(hf, paths))
    without = architectures.decoder_tensors(hf, architectures.resolve(hf, dict(paths, final_norm="")))
    assert without.norm_kind == "none" and without.norm_weight is None


def test_one_plus_w_is_read_from_the_norm_class_when_the_spec_is_silent():
    """Gemma, Gemma 2 and Gemma 3 norms multiply by ``1 + w``; Gemma 3n's by ``w`` (transformers 5 source). A
    family given by hand (no ``norm_one_plus`` in its spec) must still get ``1 + w`` from the class name."""
    import transformers.models.gemma.modeling_gemma as gemma
    import transformers.models.gemma3n.modeling_gemma3n as gemma3n

    x = torch.randn(3, 8)
    for norm in (gemma.GemmaRMSNorm(8), gemma3n.Gemma3nRMSNorm(8)):
        with torch.no_grad():
            norm.weight.fill_(0.5)
        kind, weight, _, eps = architectures.norm_params(norm)
        ours = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
        torch.testing.assert_close(ours, norm(x))
    hf = tiny_model("gemma")
    with torch.no_grad():
        hf.model.norm.weight.fill_(0.5)
    paths = {"layers": "model.layers", "final_norm": "model.norm", "lm_head": "lm_head"}
    by_hand = {k: v for k, v in architectures.resolve(hf, paths).items() if k != "norm_one_plus"}
    weight = architectures.decoder_tensors(hf, by_hand).norm_weight
    torch.testing.assert_close(weight, torch.full((hf.config.hidden_size,), 1.5))
