"""What a remote lens sends and receives on a real NDIF server, and how long it takes against the same lens
run locally. Writes ``build/ndif-measurements.json`` (quoted in the README) and checks the payloads' bounds:
the request carries code, never weights; the result carries the reductions, nothing more."""

import io
import json
import time
from pathlib import Path

import pytest
import torch

import lens_plugins as lp

ROOT = Path(__file__).resolve().parents[1]
MEASURED = {}
CASES = {
    "logit lens, top_k=10, short prompt": ("The capital of France is", lambda m: lp.nnsight.logit_lens(m, top_k=10)),
    "logit lens, top_k=10, long prompt": (
        " ".join(["The capital of France is Paris, and the capital of Italy is Rome."] * 8),
        lambda m: lp.nnsight.logit_lens(m, top_k=10),
    ),
    "attribution, Paris vs London": (
        "The capital of France is", lambda m: lp.nnsight.attribution(m, " Paris", " London"),
    ),
}


@pytest.fixture
def transfers(monkeypatch):
    """Byte counts of each request sent and each result received (compressed, as on the wire)."""
    from nnsight.intervention.backends.remote import RemoteBackend

    seen = {"request": [], "result": []}
    serialize, finalize = RemoteBackend._serialize, RemoteBackend.finalize

    def sent(self, tracer):
        blob = serialize(self, tracer)
        seen["request"].append(len(blob))
        return blob

    def received(self, content):
        seen["result"].append(len(content))
        return finalize(self, content)

    monkeypatch.setattr(RemoteBackend, "_serialize", sent)
    monkeypatch.setattr(RemoteBackend, "finalize", received)
    return seen


def timed(model, prompt, body, remote):
    with model.trace("Hi", remote=remote):  # warm: the server's replica is up, the local weights loaded
        warm = lp.nnsight.logit_lens(model, top_k=1, reductions=["top_k"])
    assert warm["stats"]["top_ids"].shape[:2] == (31, 1)
    start = time.perf_counter()
    with model.trace(prompt, remote=remote):
        out = body(model)
    return out, time.perf_counter() - start


@pytest.mark.parametrize("case", CASES)
def test_payload_and_time(model, transfers, case):
    prompt, body = CASES[case]
    remote, remote_s = timed(model, prompt, body, remote=True)
    local, local_s = timed(model, prompt, body, remote=False)
    buffer = io.BytesIO()
    torch.save(local, buffer)
    request, result = transfers["request"][-1], transfers["result"][-1]
    assert request < 100_000, "a request carries the trace's code and arguments, never weights"
    assert result <= len(buffer.getvalue()) + 4096, "the result holds what the lens saved and nothing more"
    MEASURED[case] = {
        "tokens": len(model.tokenizer(prompt)["input_ids"]), "request_bytes": request, "result_bytes": result,
        "uncompressed_result_bytes": len(buffer.getvalue()), "remote_s": round(remote_s, 3),
        "local_s": round(local_s, 3),
    }
    out = ROOT / "build" / "ndif-measurements.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(MEASURED, indent=2))
