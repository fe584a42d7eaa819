"""Against a real NDIF server: each failure is a ``RemoteLensError`` saying what happened, and the client
keeps working afterwards; a result too large to come back inline arrives through the object store."""

import socket
import time

import pytest
import torch

import lens_plugins as lp
from helpers import PROMPT, assert_identical


def still_works(model):
    """A remote lens right after a failure, compared with the local one."""
    remote = lp.nnsight.run_logit_lens(model, PROMPT, remote=True, top_k=3, targets=[" Paris"])
    local = lp.nnsight.run_logit_lens(model, PROMPT, top_k=3, targets=[" Paris"])
    assert torch.equal(remote.top_ids, local.top_ids) and torch.equal(remote.entropy, local.entropy)


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once the socket closes: nothing listens there


def test_server_down(model, ndif, monkeypatch):
    import nnsight

    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(lp.nnsight.RemoteLensError, match="could not be reached"):
        lp.nnsight.run_logit_lens(model, PROMPT, remote=True)
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", ndif["host"])
    still_works(model)


def test_a_job_that_raises_on_the_server_shows_its_traceback(model):
    with pytest.raises(lp.nnsight.RemoteLensError, match="failed on the server") as failure:
        lp.nnsight.run_logit_lens(model, PROMPT, remote=True, paths={"layers": "model.no_such_layers"})
    message = str(failure.value)
    assert "Traceback (most recent call last)" in message
    assert "has no submodule at 'model.no_such_layers'" in message  # the server's own exception
    assert "architectures.py" in message  # with the frames of the lens code that raised it, as shipped
    still_works(model)


def test_a_job_past_the_execution_timeout(model, ndif):
    """A full lens of a 3,000-token prompt needs minutes of one CPU thread (31 rows x 3,000 positions x 49,152
    logits); the server stops it at its execution timeout and says so."""
    timeout = float(ndif["env"]["NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS"])
    prompt = "one two three four five six seven eight nine ten " * 300
    start = time.perf_counter()
    with pytest.raises(lp.nnsight.RemoteLensError, match="timed out.*exceeded the execution timeout"):
        lp.nnsight.run_logit_lens(model, prompt, remote=True, top_k=1, reductions=["top_k"])
    assert timeout <= time.perf_counter() - start < timeout + 120  # + queueing and the round trip
    still_works(model)


def test_a_result_over_8_mib_arrives_through_the_object_store(model, ndif, monkeypatch):
    """Results up to Redis's pubsub limit (8 MiB here) come back inline; a larger one is uploaded to the
    object store and downloaded from a presigned URL. Here: a lens plus the full logits of 64 tokens."""
    from nnsight.intervention.backends.remote import RemoteBackend

    routes = []
    download = RemoteBackend.download_result

    def record(self, url):
        routes.append(url if isinstance(url, str) else len(url))
        return download(self, url)

    monkeypatch.setattr(RemoteBackend, "download_result", record)
    prompt = " ".join(["Paris is the capital of France and London is the capital of England."] * 4)
    with model.trace(prompt, remote=True):
        remote = lp.nnsight.logit_lens(model, top_k=5, targets=[" Paris"])
        remote_logits = model.output.logits.save()
    with model.trace(prompt):
        local = lp.nnsight.logit_lens(model, top_k=5, targets=[" Paris"])
        local_logits = model.output.logits.save()
    assert remote_logits.numel() * 4 > 8 * 2**20
    assert routes and isinstance(routes[0], str), f"expected a presigned URL, got an inline result of {routes}"
    assert routes[0].startswith(ndif["env"]["NDIF_OBJECT_STORE_URL"] + "/")
    assert_identical(remote, local)
    assert torch.equal(remote_logits, local_logits)
    routes.clear()
    still_works(model)
    assert routes and not isinstance(routes[0], str)  # a small result is inline again
