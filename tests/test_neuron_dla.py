"""``by="neuron"`` attribution and the tokens every write promotes and suppresses (``effects=k``): a layer's
neurons add up to its MLP's attribution (minus the output bias's share) exactly, the neuron view still adds up
to what is explained, chunking changes nothing, both backends agree, TransformerLens's own neuron results give
the same numbers, and the promoted / suppressed tokens are the full-vocabulary top and bottom of each write."""

import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends import transformer_lens as tl_adapter
from lens_plugins.core import dla
from lens_plugins.core.architectures import decoder_tensors, resolve
from tiny_models import tiny_model

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def smollm2_neurons(smollm2_bridge):
    return tl_adapter.run_attribution(smollm2_bridge, PROMPT, " Paris", " London", by="neuron", effects=5)


def test_neurons_add_up_to_each_mlp_and_the_neuron_view_to_what_is_explained(smollm2_neurons):
    a = smollm2_neurons
    torch.testing.assert_close(a.neuron_sums + a.mlp_bias, a.mlp, atol=2e-5, rtol=0)
    assert torch.equal(a.mlp_bias, torch.zeros_like(a.mlp_bias))  # SmolLM2's MLPs have no output bias
    assert float(a.error.max()) < 1e-4
    labels = a.labels
    assert labels[:2] == ["embed", "0_attn"] and labels[-1] == "29_mlp_rest"
    assert sum(label.count("N") == 1 and label.startswith("L") for label in labels) == 20
    top = a.top_neurons(3)
    assert abs(top[0][1]) >= abs(top[1][1]) >= abs(top[2][1])
    assert a.view("component").values.sum(-1).tolist() == pytest.approx(a.values.sum(-1).tolist(), abs=1e-4)


def test_transformer_lens_own_neuron_results_give_the_same_attributions(smollm2_bridge, smollm2_tokenizer,
                                                                        smollm2_neurons):
    """TransformerLens 4.3's ``stack_neuron_results`` (every neuron's write through the cached final-norm scale)
    projected on the same direction (the norm's weight times ``W_U[:, Paris] - W_U[:, London]``)."""
    tokenizer = smollm2_tokenizer  # the Hugging Face tokenizer: what prepend_bos=None runs (the bridge's adds a BOS)
    tokens = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        _, cache = smollm2_bridge.run_with_cache(tokens)
        W_U = smollm2_bridge.W_U.detach()
        ids = tokenizer.encode(" Paris")[0], tokenizer.encode(" London")[0]
        direction = smollm2_bridge.ln_final._original_component.weight.detach() * (W_U[:, ids[0]] - W_U[:, ids[1]])
        # (its project_output_onto= path returned zeros for this bridge in TransformerLens 4.3: project by hand)
        stack = cache.stack_neuron_results(-1, pos_slice=-1, apply_ln=True)  # [layers x d_mlp, batch, d_model]
        theirs = stack[:, 0] @ direction
    theirs = theirs.reshape(smollm2_bridge.cfg.n_layers, smollm2_bridge.cfg.d_mlp)  # [layer, neuron]
    a = smollm2_neurons
    torch.testing.assert_close(theirs.sum(-1), a.neuron_sums[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(theirs[a.neuron_layers, a.neuron_index], a.neuron_values[0], atol=1e-5, rtol=0)
    assert torch.equal(theirs.abs().flatten().topk(20).indices.sort().values,
                       (a.neuron_layers * smollm2_bridge.cfg.d_mlp + a.neuron_index).sort().values)


def test_both_backends_agree(smollm2_hf, smollm2_neurons):
    ours = lpn.run_attribution(lpn.wrap_model(*smollm2_hf), PROMPT, " Paris", " London", by="neuron", effects=5)
    theirs = smollm2_neurons
    assert ours.labels == theirs.labels
    assert torch.equal(ours.neuron_index, theirs.neuron_index) and torch.equal(ours.neuron_layers, theirs.neuron_layers)
    torch.testing.assert_close(ours.neuron_values, theirs.neuron_values, atol=1e-4, rtol=0)
    assert torch.equal(ours.promoted_ids, theirs.promoted_ids) and torch.equal(ours.suppressed_ids, theirs.suppressed_ids)
    torch.testing.assert_close(ours.promoted_logits, theirs.promoted_logits, atol=1e-4, rtol=0)
    assert [t for t, _ in ours.tokens("L20H3")["suppressed"]] == [t for t, _ in theirs.tokens("L20H3")["suppressed"]]


def test_promoted_and_suppressed_tokens_are_the_full_vocabulary_ends_of_each_write(smollm2_tokenizer, monkeypatch):
    """On a tiny GPT-2 (LayerNorm, MLP output biases): the chunked running top-k against a plain top-k over the
    whole vocabulary of each write through the frozen norm; and small neuron / vocabulary chunks change
    nothing."""
    model = lpn.wrap_model(tiny_model("gpt2"), smollm2_tokenizer)
    whole = lpn.run_attribution(model, "in it is the", " the", by="neuron", effects=4, top_neurons=6)
    monkeypatch.setattr(dla, "NEURON_CHUNK", 7)
    monkeypatch.setattr(dla, "VOCAB_CHUNK", 33)
    chunked = lpn.run_attribution(model, "in it is the", " the", by="neuron", effects=4, top_neurons=6)
    assert torch.equal(whole.neuron_index, chunked.neuron_index) and torch.equal(whole.promoted_ids, chunked.promoted_ids)
    torch.testing.assert_close(whole.neuron_sums, chunked.neuron_sums, atol=1e-5, rtol=0)
    assert bool((whole.mlp_bias != 0).all())  # GPT-2's c_proj bias: stated apart, and the sum is still exact
    torch.testing.assert_close(whole.neuron_sums + whole.mlp_bias, whole.mlp, atol=1e-5, rtol=0)
    assert float(whole.error.max()) < 1e-4
    # the reference: one write (layer 1's MLP) through the frozen final norm and all of W_U
    with model.trace("in it is the"):
        mlp_write = model.transformer.h[1].mlp.output[:, -1].save()
        final = model.transformer.h[2].output[:, -1].save()
    decoder = decoder_tensors(model, resolve(model))
    logits = dla.frozen_norm(mlp_write.unsqueeze(1), final, decoder.norm_kind, decoder.norm_weight,
                             decoder.norm_eps)[:, 0] @ decoder.W_U.float()
    c = whole.effect_labels.index("1_mlp")
    assert whole.promoted_ids[0, c].tolist() == logits[0].topk(4).indices.tolist()
    assert whole.suppressed_ids[0, c].tolist() == (-logits[0]).topk(4).indices.tolist()
    torch.testing.assert_close(whole.promoted_logits[0, c], logits[0].topk(4).values, atol=1e-5, rtol=0)


def test_refusals_are_the_same_on_both_backends(smollm2_tokenizer, smollm2_bridge):
    gemma = lpn.wrap_model(tiny_model("gemma2"), smollm2_tokenizer)
    with pytest.raises(lp.LensError, match="sandwich norm"):
        lpn.run_attribution(gemma, "in it is", " the", by="neuron")
    for bad in (dict(top_neurons=0), dict(effects=-1)):
        with pytest.raises(lp.LensError) as nn_error:
            lpn.run_attribution(gemma, "in it is", " the", by="neuron", **bad)
        with pytest.raises(lp.LensError) as tl_error:
            tl_adapter.run_attribution(smollm2_bridge, "in it is", " the", by="neuron", **bad)
        assert str(nn_error.value) == str(tl_error.value)
    with pytest.raises(lp.LensError, match="'component', 'layer', 'head' or 'neuron'"):
        tl_adapter.run_attribution(smollm2_bridge, "in it is", " the", by="neurons")
    plain = tl_adapter.run_attribution(smollm2_bridge, "in it is", " the")
    with pytest.raises(lp.LensError, match="needs the neuron split"):
        plain.view("neuron")
    with pytest.raises(lp.LensError, match="effects=k"):
        plain.tokens("0_mlp")
