"""Tokens worth tracking, found automatically (``auto_tokens=N``, ``core.track``): the candidates are every
row's top-k, the trajectories are exactly what ``targets=`` gives, a token planted to peak and fade is found,
both backends (and a serialised remote request) agree, and on SmolLM2 the tracked set holds a token that was
top-1 at an intermediate row but not at the last wherever one exists, where the final top-k often does not."""

import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends import transformer_lens as tl_adapter
from lens_plugins.backends.nnsight import logit_lens  # a remote body must name a function, not our package
from lens_plugins.core import track
from lens_plugins.core.readout import DecoderTensors
from lens_plugins.methods.lens import logit_lens_from_stack
from tiny_models import tiny_model

PROMPTS = ["The Eiffel Tower is in the city of", "When Mary and John went to the store, John gave a drink to",
           "The opposite of hot is", "1, 2, 3, 4,"]


def vanished_top1(result, batch, p):
    """Tokens that are top-1 at an intermediate row (neither the input row nor the last) but not at the last."""
    top1 = result.top_ids[:, batch, p, 0]
    return set(top1[1:-1].tolist()) - {int(top1[-1])}


def test_candidates_are_each_positions_union_of_every_rows_top_k():
    top_ids = torch.randint(0, 12, (5, 3, 4), generator=torch.Generator().manual_seed(0))
    ids = track.candidates(top_ids)
    for n in range(3):
        got = [i for i in ids[n].tolist() if i != track.NO_TOKEN]
        assert sorted(got) == sorted(set(top_ids[:, n].flatten().tolist()))


def test_a_planted_fading_token_is_found_with_its_reason_and_exact_trajectory(smollm2_tokenizer):
    """Five rows, one position, identity unembedding: token 4 is the top-1 of rows 1-3 and fades by the last
    row, whose top-1 is token 1; token 0 is the top-1 of the input row only (not an intermediate row)."""
    logits = torch.tensor([
        [5.0, 1, 0, 0, 0, 0],     # input row: token 0
        [0.0, 1, 0, 0, 2, 0],     # token 4 surfaces
        [0.0, 1, 0, 0, 4, 0],     # and peaks
        [0.0, 2, 0, 0, 2.5, 1],
        [0.0, 4, 0, 1, 1, 0],     # final: token 1; token 4 has faded
    ])
    decoder = lp.Decoder(norm_kind="none", W_U=torch.eye(6))
    stack = logits.reshape(5, 1, 1, 6)
    labels = ["embed", "0_post", "1_post", "2_post", "3_post"]
    result = logit_lens_from_stack(stack, labels, decoder, torch.tensor([[7]]), smollm2_tokenizer, top_k=2,
                                   auto_tokens=3)
    chosen = result.tracked(-1)
    assert [c["id"] for c in chosen][:2] == [1, 4]
    assert chosen[0]["reason"] == track.REASONS[track.FINAL_TOP1]
    assert chosen[1]["reason"] == track.REASONS[track.PEAKED] and chosen[1]["peak_row"] == "1_post"
    probs = torch.softmax(logits, -1)
    assert chosen[1]["score"] == pytest.approx(float(probs[2, 4] - probs[4, 4]), abs=1e-6)
    torch.testing.assert_close(result.auto_logprobs[:, 0, 0], torch.log_softmax(logits, -1)[:, [1, 4, chosen[2]["id"]]],
                               atol=1e-6, rtol=0)
    assert chosen[2]["id"] != 0 or chosen[2]["reason"] != track.REASONS[track.PEAKED]  # the input row is not a peak


def test_fewer_candidates_than_asked_leave_empty_slots(smollm2_tokenizer):
    decoder = lp.Decoder(norm_kind="none", W_U=torch.eye(4))
    stack = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]).reshape(3, 1, 1, 4)
    result = logit_lens_from_stack(stack, ["embed", "0_post", "1_post"], decoder, torch.tensor([[7]]),
                                   smollm2_tokenizer, top_k=1, auto_tokens=5)
    assert result.auto_ids[0, 0].tolist() == [2, 1, 0, -1, -1]  # final; peaked at the one middle row; the input's
    assert torch.isnan(result.auto_logprobs[:, 0, 0, -1]).all() and len(result.tracked(-1)) == 3


def test_trajectories_are_the_targets_trajectories_and_need_no_top_k_in_the_result(smollm2_bridge):
    auto = tl_adapter.run_logit_lens(smollm2_bridge, PROMPTS[0], top_k=5, auto_tokens=4, positions=[-3, -1],
                                     reductions=["entropy"])
    assert auto.top_ids is None and auto.auto_ids.shape == (1, 2, 4)
    ids = auto.auto_ids[0, -1].tolist()
    targets = tl_adapter.run_logit_lens(smollm2_bridge, PROMPTS[0], top_k=5, targets=ids, positions=[-3, -1],
                                        reductions=["entropy"])
    tracked, scored = auto.auto_logprobs[:, 0, -1], targets.target_logprobs[:, 0, -1]
    # The same float32 log-probabilities reached by two code paths (candidate columns gathered per tile vs the
    # targets' columns), whose kernels may order the same sums differently on another CPU: equal to a few ulps of
    # the largest magnitude involved, where a wrong row or token would be off by whole nats.
    ulps = 16 * torch.finfo(torch.float32).eps * tracked.abs().max()
    torch.testing.assert_close(tracked, scored, rtol=0, atol=ulps.item())


def test_both_backends_choose_the_same_tokens(smollm2_hf, smollm2_bridge):
    model = lpn.wrap_model(*smollm2_hf)
    nn_result = lpn.run_logit_lens(model, PROMPTS[2], top_k=5, auto_tokens=5)
    tl_result = tl_adapter.run_logit_lens(smollm2_bridge, PROMPTS[2], top_k=5, auto_tokens=5)
    assert torch.equal(nn_result.auto_ids, tl_result.auto_ids)
    assert torch.equal(nn_result.auto_reasons, tl_result.auto_reasons)
    assert torch.equal(nn_result.auto_peak_rows, tl_result.auto_peak_rows)
    torch.testing.assert_close(nn_result.auto_logprobs, tl_result.auto_logprobs, atol=1e-4, rtol=0, equal_nan=True)


def test_bad_auto_tokens_is_refused_the_same_on_both_backends(smollm2_tokenizer, smollm2_bridge):
    model = lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)
    with pytest.raises(lp.LensError, match="auto_tokens must be a non-negative integer") as nn_error:
        lpn.run_logit_lens(model, "in it is", auto_tokens=-2)
    with pytest.raises(lp.LensError, match="auto_tokens must be a non-negative integer") as tl_error:
        tl_adapter.run_logit_lens(smollm2_bridge, "in it is", auto_tokens=-2)
    assert str(nn_error.value) == str(tl_error.value)


def test_a_serialised_request_chooses_on_the_server(tmp_path, smollm2_tokenizer):
    """The choice runs where the model runs: a request serialised as for NDIF and run where lens_plugins
    cannot be imported comes back with the same tokens and trajectories as the local trace."""
    from test_remote_serialization import SerializeThenRunLocally, assert_same_stats, run_on_server

    hf = tiny_model("llama")
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    backend = SerializeThenRunLocally()
    with model.trace("in it is the", backend=backend):
        lens = logit_lens(model, top_k=3, auto_tokens=4, reductions=["entropy"])
    served = run_on_server(tmp_path, hf, backend.blob)
    assert_same_stats(served, lens)
    assert set(served["stats"]) >= {"auto_ids", "auto_logprobs"} and "top_ids" not in served["stats"]
    assert lpn.logit_lens_result(served, model).auto_ids.shape == (1, 4, 4)


def test_on_smollm2_the_tracked_set_holds_a_vanished_top1_more_often_than_the_final_top_k(smollm2_bridge):
    """The issue's comparison: over the prompts' positions that have a token top-1 at an intermediate row but
    not at the last, how often the tracked set (N = 5) holds one, against the final row's top 5."""
    n = 5
    result = tl_adapter.run_logit_lens(smollm2_bridge, PROMPTS, top_k=n, auto_tokens=n, padding_side="left")
    with_vanished = auto_hits = final_hits = 0
    for b in range(len(PROMPTS)):
        for p in range(len(result.positions)):
            if not result.attention_mask[b, result.positions[p]]:
                continue
            vanished = vanished_top1(result, b, p)
            if not vanished:
                continue
            with_vanished += 1
            auto_hits += bool(vanished & set(result.auto_ids[b, p].tolist()))
            final_hits += bool(vanished & set(result.top_ids[-1, b, p].tolist()))
    assert with_vanished >= 20
    assert auto_hits == with_vanished  # a vanished top-1 is always a candidate and outranks every other tier
    assert final_hits < auto_hits, (final_hits, with_vanished)  # measured: 26 of 38 positions (auto: 38 of 38)
