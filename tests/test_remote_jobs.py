"""``RemoteJob``, the handle of a ``blocking=False`` remote call, on a stand-in for nnsight's non-blocking
``RemoteBackend`` (its ``poll``: ``None`` while the job runs, the saved-values dict when it is done), and the
refusals of ``blocking=False`` where there is no server to submit to. ``tests_ndif/test_remote_jobs.py`` runs
real jobs on a local NDIF server."""

import pytest

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends.nnsight._run import RemoteJob
from tiny_models import tiny_model


class Job:
    """A job that completes on its ``after``-th poll, with ``saved`` as what the trace body saved."""

    def __init__(self, saved, after=3, error=None):
        self.job_id, self.status, self.host = "job-1", None, "http://localhost:1"
        self.saved, self.after, self.error, self.polls = saved, after, error, 0

    def poll(self):
        self.polls += 1
        if self.error is not None:
            raise self.error
        self.status = type("Status", (), {"name": "RUNNING"})()
        return {"saved": self.saved} if self.polls >= self.after else None


def test_result_waits_for_the_job_and_labels_what_it_saved():
    backend = Job({"x": 2})
    job = RemoteJob(backend, lambda saved: saved["x"] * 10)
    assert job.status() == "RUNNING" and not job.done()
    assert job.result(interval=0) == 20 and backend.polls == 3
    assert job.status() == "COMPLETED" and backend.polls == 3  # a finished job is not asked again


def test_a_timeout_a_server_error_and_a_cancel_are_named():
    with pytest.raises(lp.errors.RemoteLensError, match="did not finish within"):
        RemoteJob(Job({}, after=10**9), lambda saved: saved).result(timeout=0.05, interval=0.01)
    from nnsight.intervention.backends.remote import RemoteError

    with pytest.raises(lp.errors.RemoteLensError, match="failed on the server"):
        RemoteJob(Job({}, error=RemoteError("boom")), lambda saved: saved).result()
    job = RemoteJob(Job({}), lambda saved: saved)
    job.cancel()
    assert job.status() == "CANCELLED"
    with pytest.raises(lp.errors.RemoteLensError, match="cancelled"):
        job.result()


def test_blocking_false_needs_a_server(smollm2_tokenizer):
    model = lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)
    for remote in (False, "local"):
        with pytest.raises(lp.LensError, match="blocking=False submits a job to an NDIF server"):
            lpn.run_logit_lens(model, "in it is", remote=remote, blocking=False)
    with pytest.raises(lp.LensError, match="blocking=False submits a job to an NDIF server"):
        lpn.run_attention(model, "in it is", remote=False, blocking=False)
    with pytest.raises(lp.LensError, match="not backend="):
        lpn.run_attribution(model, "in it is", " the", backend=object(), blocking=False)
