"""DoLa decoding: hand-computed scores, the final layer as the only candidate is greedy decoding, the
layer choice is the independent JS argmax, and both backends decode the same tokens."""

import pytest
import torch

from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends import transformer_lens as tl_adapter
from lens_plugins.core import dola
from tiny_models import tiny_model

PROMPT = torch.tensor([[5, 17, 300, 42, 7]])
N_LAYERS = 3  # tiny_models' Llama


@pytest.fixture(scope="module")
def hf():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def nn_model(smollm2_tokenizer):
    return lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)


@pytest.fixture(scope="module")
def bridge(smollm2_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"),
                                               tokenizer=smollm2_tokenizer).eval()


def hidden_logprobs(hf, ids):
    """Every hidden state's log-probs at the last position, each through the final norm and lm_head, the
    plain way (full softmax): ``[n_layers + 1, vocab]``, the last row being the model's own."""
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        hidden = torch.stack([h[0, -1] for h in out.hidden_states[:-1]])
        logits = torch.cat([hf.lm_head(hf.model.norm(hidden)), out.logits[0, -1:]])
    return torch.log_softmax(logits.float(), -1)


def js(p_log, q_log):
    p, q = p_log.exp(), q_log.exp()
    m = (p + q) / 2
    return 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)


def test_step_matches_a_hand_computation(hf):
    logprobs = hidden_logprobs(hf, PROMPT)
    layers = [0, 1, 2]
    expected_js = js(logprobs[layers], logprobs[-1:])
    premature = layers[int(expected_js.argmax())]
    mature = logprobs[-1]
    plausible = mature.exp() >= 0.1 * mature.exp().max()
    expected = torch.where(plausible, mature - logprobs[premature], torch.tensor(float("-inf")))

    decoder = lpn.decoder_for(hf)
    with torch.no_grad():
        out = hf(PROMPT, output_hidden_states=True)
    rows = torch.stack([out.hidden_states[i][0, -1] for i in layers])
    with torch.no_grad():  # HF's last hidden state is after the final norm; DoLa takes the block's output
        final = _last_block_output(hf, PROMPT)
    step = dola.dola_step(rows, final, layers, N_LAYERS, decoder, 0.1, PROMPT[0].tolist(), None, True)
    torch.testing.assert_close(step["js"], expected_js, atol=1e-6, rtol=1e-4)
    assert step["layer"] == premature
    assert torch.equal(torch.isinf(step["scores"]), torch.isinf(expected))
    torch.testing.assert_close(step["scores"][plausible], expected[plausible], atol=1e-5, rtol=0)
    assert step["token"] == int(expected.argmax())


def _last_block_output(hf, ids):
    captured = {}
    handle = hf.model.layers[-1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    try:
        hf(ids)
    finally:
        handle.remove()
    return captured["h"][0, -1]


def test_contrast_and_penalty_by_hand():
    mature = torch.tensor([2.0, 1.0, -3.0, 1.5])
    premature = torch.tensor([0.0, 2.0, 0.0, 0.0])
    scores = dola.contrast(mature, premature, 0.1)
    m, p = torch.log_softmax(mature, -1), torch.log_softmax(premature, -1)
    keep = m.exp() >= 0.1 * m.exp().max()
    assert keep.tolist() == [True, True, False, True]
    torch.testing.assert_close(scores[keep], (m - p)[keep])
    assert scores[2] == float("-inf")
    penalised = dola.penalise(scores, [0, 1, 1], 2.0)
    for i in (0, 1):
        assert penalised[i] == (scores[i] * 2 if scores[i] < 0 else scores[i] / 2)
    assert penalised[3] == scores[3] and penalised[2] == float("-inf")
    # Ties in the contrast go to the mature favourite, not to the lowest id.
    assert dola.pick(torch.tensor([0.0, 0.0, float("-inf")]), torch.tensor([-2.0, -0.5, -0.1])) == 1


def test_candidate_buckets_follow_transformers_4():
    assert dola.candidate_layers("high", 30, True) == list(range(15, 30, 2))
    assert dola.candidate_layers("low", 30, True) == list(range(2, 15, 2))
    assert dola.candidate_layers("low", 30, False) == list(range(0, 15, 2))
    assert dola.candidate_layers("high", 48, False) == list(range(28, 48, 2))
    assert dola.candidate_layers("low", 48, True) == list(range(2, 20, 2))
    with pytest.raises(ValueError, match="names no layer"):
        dola.candidate_layers("low", 3, True)
    with pytest.raises(ValueError, match="not hidden-state indices"):
        dola.candidate_layers([0, 5], 3, True)


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
def test_final_layer_alone_is_greedy(backend, hf, nn_model, bridge):
    run = lpn.run_dola if backend == "nnsight" else tl_adapter.run_dola
    model = nn_model if backend == "nnsight" else bridge
    out = run(model, PROMPT, max_new_tokens=6, layers=[N_LAYERS])
    greedy = hf.generate(PROMPT, do_sample=False, max_new_tokens=6)
    assert torch.equal(out.token_ids, greedy[0])
    assert out.premature_layers == [N_LAYERS] * 6 and (out.js == 0).all()


@pytest.mark.parametrize("penalty", [None, 1.3])
def test_backends_agree_and_layer_choice_is_the_js_argmax(penalty, hf, nn_model, bridge):
    layers = [0, 1, 2]
    ours = lpn.run_dola(nn_model, PROMPT, max_new_tokens=6, layers=layers, repetition_penalty=penalty)
    theirs = tl_adapter.run_dola(bridge, PROMPT, max_new_tokens=6, layers=layers, repetition_penalty=penalty)
    assert torch.equal(ours.token_ids, theirs.token_ids)
    assert ours.premature_layers == theirs.premature_layers
    torch.testing.assert_close(ours.js, theirs.js, atol=1e-6, rtol=1e-4)
    # Independently: at every step, the JS argmax over the candidates of the sequence so far.
    for step, layer in enumerate(ours.premature_layers):
        ids = ours.token_ids[: ours.prompt_length + step].unsqueeze(0)
        logprobs = hidden_logprobs(hf, ids)
        divergences = js(logprobs[layers], logprobs[-1:])
        assert layer == layers[int(divergences.argmax())]
        torch.testing.assert_close(ours.js[step], divergences, atol=1e-6, rtol=1e-4)
    greedy = hf.generate(PROMPT, do_sample=False, max_new_tokens=6)[0]
    assert not torch.equal(ours.token_ids, greedy)  # the contrast does change the decoding here


def test_tied_embeddings_choose_the_low_bucket_on_both_backends(nn_model, bridge):
    """``tied_embeddings=`` (tied embeddings are skipped from the "low" bucket: they decode to the input token)
    is an option of both backends: untied, the 3-layer model's low bucket is the embeddings; tied, it is empty,
    which both refuse."""
    runs = (lambda **kw: lpn.run_dola(nn_model, PROMPT, max_new_tokens=2, layers="low", **kw),
            lambda **kw: tl_adapter.run_dola(bridge, PROMPT, max_new_tokens=2, layers="low", **kw))
    for run in runs:
        assert run(tied_embeddings=False).candidate_layers == dola.candidate_layers("low", N_LAYERS, False) == [0]
        with pytest.raises(ValueError, match="names no layer of a 3-layer model with tie_word_embeddings=True"):
            run(tied_embeddings=True)


@pytest.mark.parametrize("option, value, message", [
    ("repetition_penalty", float("nan"), "repetition_penalty must be a positive finite number"),
    ("repetition_penalty", 0.0, "repetition_penalty must be a positive finite number"),
    ("alpha", 1.5, r"alpha must be in \(0, 1\]"),
])
def test_bad_options_are_refused_before_any_forward_on_both_backends(nn_model, bridge, option, value, message):
    """A NaN penalty used to turn every seen token's score into NaN; both backends now refuse it (and a bad
    alpha) with the same message before the first forward pass."""
    calls = []
    handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in
               (nn_model._module, bridge.original_model)]
    try:
        for run in (lpn.run_dola, tl_adapter.run_dola):
            model = nn_model if run is lpn.run_dola else bridge
            with pytest.raises(ValueError, match=message):
                run(model, PROMPT, max_new_tokens=2, **{option: value})
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []
