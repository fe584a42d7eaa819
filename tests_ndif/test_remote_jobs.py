"""Non-blocking remote jobs against a real NDIF server: ``blocking=False`` returns a ``RemoteJob`` at once;
several jobs are in flight from one client together, and each ``result()`` is the same result, bit for bit, as
the call run locally; a job that fails on the server and a cancelled job are named."""

import pytest

import lens_plugins as lp
from helpers import PROMPT, assert_identical

PROMPTS = [PROMPT, "The Eiffel Tower is in the city of", "1, 2, 3, 4,"]


def test_several_jobs_in_flight_from_one_client(model):
    lenses = [lp.nnsight.run_logit_lens(model, prompt, remote=True, blocking=False, targets=[" Paris"], auto_tokens=3)
              for prompt in PROMPTS]
    dla = lp.nnsight.run_attribution(model, PROMPT, " Paris", " London", remote=True, blocking=False, by="neuron",
                                     effects=3)
    patterns = lp.nnsight.run_attention(model, PROMPT, [0, 29], remote=True, blocking=False)
    jobs = lenses + [dla, patterns]
    assert len({job.job_id for job in jobs}) == len(jobs)  # every submission returned before any result came
    from nnsight.schema.response import Status

    known = {status.name for status in Status} - {"ERROR"} | {"PENDING"}
    assert all(job.status() in known for job in jobs), [job.status() for job in jobs]
    for prompt, job in zip(PROMPTS, lenses):
        result = job.result(timeout=180)
        local = lp.nnsight.run_logit_lens(model, prompt, targets=[" Paris"], auto_tokens=3)
        for field in ("top_ids", "top_logprobs", "target_logprobs", "auto_ids", "auto_logprobs", "entropy"):
            assert_identical(getattr(result, field), getattr(local, field), field)
        assert job.done() and job.status() == "COMPLETED"
    remote = dla.result(timeout=180)
    local = lp.nnsight.run_attribution(model, PROMPT, " Paris", " London", by="neuron", effects=3)
    assert remote.labels == local.labels
    for field in ("neuron_values", "neuron_index", "mlp", "promoted_ids"):
        assert_identical(getattr(remote, field), getattr(local, field), field)
    assert_identical(patterns.result(timeout=180).patterns, lp.nnsight.run_attention(model, PROMPT, [0, 29]).patterns)


def test_a_failed_job_and_a_cancelled_job_are_named(model):
    failing = lp.nnsight.run_logit_lens(model, PROMPT, remote=True, blocking=False, targets=[" Paris London"])
    cancelled = lp.nnsight.run_logit_lens(model, PROMPT, remote=True, blocking=False)
    cancelled.cancel()
    assert cancelled.status() == "CANCELLED"
    with pytest.raises(lp.errors.RemoteLensError, match="cancelled"):
        cancelled.result()
    with pytest.raises(lp.errors.RemoteLensError, match="failed on the server"):
        failing.result(timeout=180)
