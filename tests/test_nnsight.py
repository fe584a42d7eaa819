"""The in-trace nnsight lens: agreement with TransformerLens, batching with padding, patched runs,
``remote="local"``, remote failures, and import order with beartype."""

import math
import subprocess
import sys

import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends import transformer_lens as tl_adapter
from tiny_models import random_tokens, tiny_model

PROMPT = "The capital of France is"
TOL = 1e-4
FLOAT_FIELDS = ("top_logprobs", "entropy", "kl_final_row", "kl_row_final", "final_top1_logprob",
                "next_token_logprob", "target_logprobs")
EXACT_FIELDS = ("top_ids", "final_top1", "final_top1_rank", "next_token_rank", "target_ranks", "token_ids")


@pytest.fixture(scope="module")
def smollm2(smollm2_hf):
    return lpn.wrap_model(*smollm2_hf)


@pytest.fixture(scope="module")
def tiny_llama(smollm2_tokenizer):
    return lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)


def assert_same_result(ours, theirs):
    assert ours.labels == theirs.labels and ours.positions == theirs.positions
    assert ours.target_names == theirs.target_names
    for name in EXACT_FIELDS:
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    for name in FLOAT_FIELDS:
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=TOL, rtol=0, equal_nan=True,
                                   msg=name)


def test_smollm2_paris_is_final_top1(smollm2):
    result = lpn.run_logit_lens(smollm2, PROMPT, top_k=5, targets=[" Paris"])
    assert result.token(result.final_top1[0, -1]) == " Paris"
    assert result.top_tokens(-1)["29_post"][0][0] == " Paris"
    assert result.rank_of(" Paris")[-1, 0, -1] == 1
    assert result.labels[0] == "embed" and result.labels[-1] == "29_post" and len(result.labels) == 31


def test_matches_transformer_lens_on_smollm2(smollm2, smollm2_bridge):
    tokens = smollm2_bridge.to_tokens(PROMPT)
    with torch.no_grad():
        _, cache = smollm2_bridge.run_with_cache(tokens, names_filter=tl_adapter.hook_filter(smollm2_bridge))
    theirs = tl_adapter.logit_lens(cache, tokens=tokens, top_k=10, targets=[" Paris", " London"])
    with smollm2.trace(tokens):
        lens = lpn.logit_lens(smollm2, top_k=10, targets=[" Paris", " London"])
    assert_same_result(lpn.logit_lens_result(lens, smollm2), theirs)


def test_matches_transformer_lens_on_tiny_gpt2(smollm2_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("tiny-gpt2", hf_model=tiny_model("gpt2"),
                                                 tokenizer=smollm2_tokenizer).eval()
    model = lpn.wrap_model(tiny_model("gpt2"), smollm2_tokenizer)
    tokens = random_tokens(batch=2, seq=7)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=tl_adapter.hook_filter(bridge))
    theirs = tl_adapter.logit_lens(cache, tokens=tokens, top_k=4, targets=[17], positions=[1, -1])
    with model.trace(tokens):
        lens = lpn.logit_lens(model, top_k=4, targets=[17], positions=[1, -1])
    assert_same_result(lpn.logit_lens_result(lens, model), theirs)


def _single(model, prompt):
    with model.trace(prompt):
        lens = lpn.logit_lens(model, top_k=3, targets=[" the"])
    return lpn.logit_lens_result(lens, model)


def test_batched_prompts_with_padding_match_one_at_a_time(tiny_llama):
    prompts = ["in it is the", "in", "is the"]  # ids below the tiny vocabulary's 1000
    singles = [_single(tiny_llama, p) for p in prompts]
    with tiny_llama.trace() as tracer:
        with tracer.invoke(prompts[0]):
            first = lpn.logit_lens(tiny_llama, top_k=3, targets=[" the"])
        with tracer.invoke(prompts[1]):
            second = lpn.logit_lens(tiny_llama, top_k=3, targets=[" the"])
        with tracer.invoke(prompts[2]):
            pass
        with tracer.invoke():
            whole = lpn.logit_lens(tiny_llama, top_k=3, targets=[" the"])
    whole = lpn.logit_lens_result(whole, tiny_llama)
    per_invoke = [lpn.logit_lens_result(first, tiny_llama), lpn.logit_lens_result(second, tiny_llama)]
    assert whole.top_ids.shape[1] == 3
    for b, single in enumerate(singles):
        n = single.token_ids.shape[1]
        batched = [(whole, b)] + ([(per_invoke[b], 0)] if b < 2 else [])
        for result, row in batched:
            real = slice(result.token_ids.shape[1] - n, None)  # left padding
            assert torch.equal(result.token_ids[row, real], single.token_ids[0])
            for name in EXACT_FIELDS[:1] + ("next_token_rank", "target_ranks"):
                assert torch.equal(getattr(result, name)[:, row, real], getattr(single, name)[:, 0]), name
            for name in FLOAT_FIELDS:
                torch.testing.assert_close(getattr(result, name)[:, row, real], getattr(single, name)[:, 0],
                                           atol=TOL, rtol=0, equal_nan=True, msg=name)
    pad = whole.next_token_rank[:, 1, : whole.token_ids.shape[1] - singles[1].token_ids.shape[1]]
    assert (pad == -1).all()  # a padding position has no next token to score


def test_lens_sees_a_patch_made_in_another_invoke(tiny_llama):
    tokens = random_tokens(batch=1, seq=6)
    clean = _single(tiny_llama, tokens)
    with tiny_llama.trace() as tracer:
        with tracer.invoke(tokens):
            tiny_llama.model.layers[1].output[:] = 0.0
            logits = tiny_llama.output.logits.save()
        with tracer.invoke():
            lens = lpn.logit_lens(tiny_llama, top_k=3, targets=[" the"])
    patched = lpn.logit_lens_result(lens, tiny_llama)
    assert torch.equal(patched.top_ids[:2], clean.top_ids[:2])  # embed, 1_pre: before the patch
    # 2_pre is the zeroed output itself: RMSNorm(0) = 0 and no lm_head bias, so every logit is 0 and the row
    # is uniform over the vocabulary, where the clean row is not.
    uniform = math.log(tiny_llama.config.vocab_size)
    torch.testing.assert_close(patched.entropy[2], torch.full_like(patched.entropy[2], uniform), atol=1e-5, rtol=0)
    assert (clean.entropy[2] - uniform).abs().min() > 1e-3
    # 2_post is what the patched model predicted.
    reference = logits.float().log_softmax(-1).topk(3, dim=-1).values
    torch.testing.assert_close(patched.top_logprobs[-1], reference, atol=1e-4, rtol=0)
    assert torch.equal(patched.final_top1, logits.argmax(-1))


def test_lens_after_a_patch_in_the_same_block_says_how_to_fix_it(tiny_llama):
    from nnsight.intervention.interleaver import OutOfOrderError

    with pytest.raises(OutOfOrderError, match="empty `with tracer.invoke"):
        with tiny_llama.trace(random_tokens(batch=1, seq=4)):
            tiny_llama.model.layers[1].output[:] = 0.0
            lpn.logit_lens(tiny_llama)


def test_remote_local_matches_local(smollm2):
    with smollm2.trace(PROMPT):
        local = lpn.logit_lens(smollm2, top_k=5, targets=[" Paris"], positions=[-1])
    with smollm2.trace(PROMPT, remote="local"):
        simulated = lpn.logit_lens(smollm2, top_k=5, targets=[" Paris"], positions=[-1])
    assert_same_result(lpn.logit_lens_result(simulated, smollm2), lpn.logit_lens_result(local, smollm2))


def test_unknown_target_is_refused_with_its_tokenisation(tiny_llama):
    with pytest.raises(ValueError, match="not one"):
        lpn.run_logit_lens(tiny_llama, "in it", targets=[" Parisian cafe"])


def test_result_refuses_other_values(tiny_llama):
    with pytest.raises(TypeError, match="expected what logit_lens"):
        lpn.logit_lens_result({"top_ids": torch.zeros(1)}, tiny_llama)


# --- remote failures (never a real server: 127.0.0.1 and mocks only) --------------------------------------


def _remote_backend(**kwargs):
    from nnsight.intervention.backends.remote import RemoteBackend

    return RemoteBackend("lens-plugins-test-model", host="http://127.0.0.1:9", **kwargs)


def test_unreachable_server_is_named_and_nothing_is_lost(tiny_llama):
    with pytest.raises(lpn.RemoteLensError, match="could not be reached"):
        lpn.run_logit_lens(tiny_llama, "in it", backend=_remote_backend())
    assert lpn.run_logit_lens(tiny_llama, "in it").top_ids.shape[0] == 4  # the model still works locally


def test_job_error_is_named(tiny_llama):
    from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

    class FailingJob(RemoteBackend):
        def request(self, request, tracer):
            self._serialize(tracer)  # the request itself must still serialise
            raise RemoteError("RuntimeError: CUDA out of memory")

    backend = FailingJob("lens-plugins-test-model", host="http://127.0.0.1:9")
    with pytest.raises(lpn.RemoteLensError, match="failed on the server.*CUDA out of memory"):
        lpn.run_logit_lens(tiny_llama, "in it", backend=backend)


def test_timeout_is_named(tiny_llama, monkeypatch):
    import httpx
    import websocket

    class Connection:
        def recv(self):
            return '{"session_id": "s"}'

        def close(self):
            pass

    def timeout(*args, **kwargs):
        raise httpx.ReadTimeout("timed out")

    monkeypatch.setattr(websocket, "create_connection", lambda *a, **k: Connection())
    monkeypatch.setattr(httpx.Client, "post", timeout)
    with pytest.raises(lpn.RemoteLensError, match="timed out"):
        lpn.run_logit_lens(tiny_llama, "in it", backend=_remote_backend())


# --- import order ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["nnsight", "lens_plugins.typecheck"])
def test_import_order_with_beartype_does_not_matter(first):
    second = "lens_plugins.typecheck" if first == "nnsight" else "nnsight"
    code = f"""
import {first}, {second}
import torch
from lens_plugins.decoder import Decoder
try:
    Decoder("none", torch.zeros(3))
except Exception as error:
    from jaxtyping import TypeCheckError
    assert isinstance(error, TypeCheckError) and type(error).__name__ == "ArgumentTypeError", error
else:
    raise AssertionError("the jaxtyping check did not run")
assert (5).save is not None  # nnsight's .save mount survived
import beartype
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
