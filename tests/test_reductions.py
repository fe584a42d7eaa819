"""Every opt-in reduction against an independent closed form, and the derived quantities of a result."""

import math

import pytest
import scipy.spatial.distance
import scipy.special
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lens_plugins as lp
from lens_plugins.core import readout, reductions, request as prompt
from lens_plugins.decoder import Decoder
from test_readout import random_case
from tiny_models import random_tokens, tiny_model

ALL = readout.REDUCTIONS


def full_logprobs(resid, decoder):
    return decoder.logits(resid).log_softmax(-1).double()


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_divergences_against_scipy_and_explicit_formulas(softcap):
    resid, decoder, targets = random_case(rows=5, tokens=6, vocab=120, softcap=softcap, seed=11)
    out = decoder.statistics(resid, targets, top_k=3, vocab_chunk=25, token_chunk=4, reductions=ALL)
    logp = full_logprobs(resid, decoder)
    p = logp.exp()
    final, first = p[-1], p[0]
    js = torch.tensor(scipy.spatial.distance.jensenshannon(p.numpy(), final.expand_as(p).numpy(), axis=-1)) ** 2
    torch.testing.assert_close(out["js_final"].double(), js, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out["tv_final"].double(), 0.5 * (p - final).abs().sum(-1), atol=2e-6, rtol=1e-5)
    kl_input = torch.tensor(scipy.special.rel_entr(first.numpy(), p.numpy()).sum(-1))
    torch.testing.assert_close(out["kl_input_row"].double(), kl_input, atol=5e-5, rtol=1e-5)
    kl_next = (p[:-1] * (logp[:-1] - logp[1:])).sum(-1)
    torch.testing.assert_close(out["kl_next_row"][:-1].double(), kl_next, atol=5e-5, rtol=1e-5)
    assert out["kl_next_row"][-1].isnan().all()
    # A row against itself: exactly zero, not merely small.
    assert torch.equal(out["js_final"][-1], torch.zeros(6)) and torch.equal(out["tv_final"][-1], torch.zeros(6))
    assert torch.equal(out["kl_input_row"][0], torch.zeros(6))


def test_js_is_not_symmetrised_kl_and_tv_is_not_max_difference():
    """The two definitions tuned-lens gets wrong, on distributions where each differs from ours.

    JS: a near-one-hot pair, where symmetrised KL exceeds ln 2 and JS cannot. TV: mass that moves between
    several tokens on both sides, p = (0.5, 0.5, 0, 0) and q = (0, 0, 0.5, 0.5), where half the L1 distance
    is 1 and max |p - q| is 0.5 (with mass leaving or reaching a single token the two coincide, so such a
    pair cannot tell them apart)."""
    decoder = Decoder(norm_kind="none", W_U=torch.eye(3))
    p = torch.tensor([0.98, 0.01, 0.01]).log()
    q = torch.tensor([0.01, 0.01, 0.98]).log()
    out = decoder.statistics(torch.stack([p, q]).unsqueeze(1), torch.zeros(1, 0, dtype=torch.long), 1, 3, 1, ALL)
    p, q = p.exp().double(), q.exp().double()
    m = (p + q) / 2
    js = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    symmetrised_kl = (p * (p / q).log()).sum() + (q * (q / p).log()).sum()
    assert js < math.log(2) < symmetrised_kl
    torch.testing.assert_close(out["js_final"][0, 0].double(), js, atol=1e-6, rtol=0)

    tiny = 1e-30  # log(0) would be -inf; this is 0 to float32 probability
    p2, q2 = torch.tensor([0.5, 0.5, tiny, tiny]), torch.tensor([tiny, tiny, 0.5, 0.5])
    assert (p2 - q2).abs().max() == 0.5 and 0.5 * (p2 - q2).abs().sum() == 1.0
    wide = Decoder(norm_kind="none", W_U=torch.eye(4))
    for vocab_chunk in (4, 1):  # one tile, and one token per tile (the streamed sum across tiles)
        out2 = wide.statistics(torch.stack([p2.log(), q2.log()]).unsqueeze(1), torch.zeros(1, 0, dtype=torch.long),
                               1, vocab_chunk, 1, ("tv_final",))
        assert out2["tv_final"][0, 0].item() == pytest.approx(1.0, abs=1e-6), f"vocab_chunk={vocab_chunk}"


def test_one_hot_rows():
    big = 1000.0  # far beyond float32's exp range: exactly one-hot after normalisation
    decoder = Decoder(norm_kind="none", W_U=torch.eye(4))
    one_hot = torch.tensor([big, 0, 0, 0])
    other = torch.tensor([0, big, 0, 0])
    out = decoder.statistics(torch.stack([one_hot, other, one_hot]).unsqueeze(1), torch.tensor([[1]]), 2, 3, 1, ALL)
    assert torch.equal(out["entropy"][:, 0], torch.zeros(3))
    assert out["js_final"][1, 0].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out["tv_final"][1, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert out["target_ranks"][:, 0, 0].tolist() == [2, 1, 2]
    assert torch.isfinite(out["kl_final_row"][0]).all() and out["kl_final_row"][0, 0] == 0


def test_float16_logits_that_underflow_are_reduced_in_float32():
    """Logit gaps of ~30 nats: exp underflows to 0 in float16 (below 6e-8) but not in float32."""
    decoder = Decoder(norm_kind="none", W_U=torch.eye(5, dtype=torch.float16))
    row = torch.tensor([0.0, -20.0, -25.0, -30.0, -35.0], dtype=torch.float16)
    out = decoder.statistics(torch.stack([row, row.flip(0)]).unsqueeze(1), torch.tensor([[4]]), 5, 2, 1, ALL)
    exact = full_logprobs(torch.stack([row, row.flip(0)]).unsqueeze(1).float(), Decoder(norm_kind="none", W_U=torch.eye(5)))
    torch.testing.assert_close(out["target_logprobs"][:, 0, 0].double(), exact[:, 0, 4], atol=1e-5, rtol=1e-6)
    assert out["target_logprobs"][0, 0, 0].item() == pytest.approx(-35.0, abs=1e-4)  # p = 6e-16, not 0
    assert all(torch.isfinite(v).all() for k, v in out.items() if v.is_floating_point() and k != "kl_next_row")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 100_000), scale=st.floats(0.01, 30.0), vocab_chunk=st.integers(1, 50))
def test_js_and_tv_are_bounded(seed, scale, vocab_chunk):
    resid, decoder, targets = random_case(rows=3, tokens=3, d=6, vocab=50, seed=seed, scale=scale)
    out = decoder.statistics(resid, targets, 1, vocab_chunk, 2, ("js_final", "tv_final"))
    # Bounds hold up to float32 rounding of the normalised probabilities (measured excess <= 3e-6).
    assert (out["js_final"] >= -1e-5).all() and (out["js_final"] <= math.log(2) + 1e-5).all()
    assert (out["tv_final"] >= 0).all() and (out["tv_final"] <= 1 + 1e-5).all()


@pytest.mark.parametrize("vocab_chunk,token_chunk", [(1, 1), (13, 2), (120, 6)])
def test_new_reductions_do_not_depend_on_chunk_sizes(vocab_chunk, token_chunk):
    resid, decoder, targets = random_case(rows=4, tokens=6, vocab=120, seed=2)
    reference = decoder.statistics(resid, targets, 3, 120, 6, ALL)
    chunked = decoder.statistics(resid, targets, 3, vocab_chunk, token_chunk, ALL)
    for name in ("js_final", "tv_final", "kl_input_row", "kl_next_row"):
        torch.testing.assert_close(chunked[name], reference[name], atol=5e-5, rtol=1e-5, equal_nan=True, msg=name)


def test_only_requested_reductions_are_computed():
    resid, decoder, targets = random_case()
    out = decoder.statistics(resid, targets, 3, 64, 4, ("entropy",))
    assert set(out) == {"log_partition", "entropy"}
    with pytest.raises(ValueError, match=r"unknown reductions \['entropie'\]"):
        decoder.statistics(resid, targets, 3, 64, 4, ("entropie",))
    with pytest.raises(ValueError, match="unknown reductions"):
        prompt.check_reductions(["entropie"])


# --- through the adapters -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_pair(smollm2_tokenizer):
    """The same tiny GPT-2 weights behind a TransformerBridge cache and an nnsight model."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("tiny-gpt2", hf_model=tiny_model("gpt2"), tokenizer=smollm2_tokenizer).eval()
    nn_model = lp.nnsight.wrap_model(tiny_model("gpt2"), smollm2_tokenizer)
    return bridge, nn_model


LENS_ALL = reductions.LENS
SETS = {"the": [" the", " The", "The"]}


def test_every_reduction_agrees_between_transformer_lens_and_nnsight(gpt2_pair):
    bridge, nn_model = gpt2_pair
    tokens = random_tokens(batch=1, seq=8, seed=3)
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge))
    tl = cache.lens.logit_lens(tokens=tokens, reductions=LENS_ALL, targets=[" of"], token_sets=SETS)
    with nn_model.trace(tokens):
        saved = lp.nnsight.logit_lens(nn_model, top_k=5, reductions=LENS_ALL, targets=[" of"], token_sets=SETS)
    nn = lp.nnsight.logit_lens_result(saved, nn_model)
    for name in ("entropy", "kl_final_row", "kl_row_final", "js_final", "tv_final", "kl_input_row", "kl_next_row",
                 "next_token_logprob", "input_token_logprob", "target_logprobs", "set_logprobs", "top_logprobs"):
        torch.testing.assert_close(getattr(nn, name), getattr(tl, name), atol=1e-4, rtol=1e-4, equal_nan=True, msg=name)
    for name in ("top_ids", "final_top1_rank", "next_token_rank", "input_token_rank", "target_ranks", "set_ranks"):
        assert torch.equal(getattr(nn, name), getattr(tl, name)), name


def test_token_set_probability_is_the_sum_of_its_members(gpt2_pair):
    bridge, _ = gpt2_pair
    tokens = random_tokens(batch=2, seq=5, seed=8)
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge))
    members = SETS["the"]
    res = cache.lens.logit_lens(tokens=tokens, targets=members, token_sets=SETS)
    summed = sum(res.logprob_of(m).exp() for m in members)
    torch.testing.assert_close(res.set_prob("the"), summed, atol=1e-6, rtol=1e-5)
    best = torch.stack([res.rank_of(m) for m in members]).amin(0)
    assert torch.equal(res.set_rank("the"), best)
    assert res.set_members == [members]


def test_derived_quantities(gpt2_pair):
    bridge, _ = gpt2_pair
    tokens = random_tokens(batch=2, seq=6, seed=5)
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge))
    res = cache.lens.logit_lens(tokens=tokens, top_k=3)
    logp = cache.lens.decoder().logits(cache["blocks.2.hook_resid_post"]).log_softmax(-1)
    truth = logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    assert res.cross_entropy()[-1].item() == pytest.approx(-truth.mean().item(), abs=1e-5)
    ranks = (logp[:, :-1] > truth.unsqueeze(-1)).sum(-1) + 1
    assert res.top_k_accuracy(3)[-1].item() == pytest.approx((ranks <= 3).float().mean().item())
    torch.testing.assert_close(res.entropy_bits(), res.entropy / math.log(2))
    torch.testing.assert_close(res.diff("entropy"), res.entropy[1:] - res.entropy[:-1])
    torch.testing.assert_close(res.top1_logit()[-1], cache.lens.decoder().logits(cache["blocks.2.hook_resid_post"]).amax(-1))
    assert res.top1_agreement()[-1].all()
    with pytest.raises(ValueError, match="add 'js_final' to reductions"):
        res.metric("js_final")


def test_variants_show_what_they_gathered(smollm2_tokenizer, capsys):
    kept = lp.tokens.variants(smollm2_tokenizer, "Paris")
    assert " Paris" in kept and "Paris" in kept
    assert all(len(smollm2_tokenizer.encode(k, add_special_tokens=False)) == 1 for k in kept)
    printed = capsys.readouterr().out
    assert "kept" in printed and "dropped multi-token" in printed and "' PARIS'" in printed


def test_input_token_is_ranked_first_at_the_embeddings_and_discarded_after_block_one(smollm2_bridge):
    """nostalgebraist's 'input discarding' addendum, on SmolLM2 (tied embeddings)."""
    text = ("The logit lens decodes each layer's residual stream through the model's final norm and "
            "unembedding. Paris is the capital of France.")
    res = lp.transformer_lens.run_logit_lens(smollm2_bridge, text, reductions=("input_token", "kl_input_row"))
    ranks = res.input_token_rank[:, 0].float()
    assert (ranks[0] == 1).float().mean() > 0.6  # most tokens are their own top prediction at the embeddings
    assert (ranks[1] == 1).float().mean() < 0.1 and ranks[1].median() > 20  # ... and not after block 0
    assert (res.kl_input_row[1:, 0].mean(-1) > 1).all()


def test_a_target_outside_the_models_vocabulary_is_refused(gpt2_pair):
    bridge, _ = gpt2_pair  # a 1000-token model behind SmolLM2's 49152-token tokenizer
    tokens = random_tokens()
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge))
    with pytest.raises(ValueError, match="'the' is token id 1195, outside this model's vocabulary of 1000"):
        cache.lens.logit_lens(tokens=tokens, token_sets={"the": ["the"]})
