"""Several clients at once against one NDIF server: 4 processes x 5 requests, each request a different
prompt; every client gets its own results, bit-identical to the same lens run locally."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import lens_plugins as lp
from helpers import assert_identical

CLIENTS, REQUESTS = 4, 5
SUBJECTS = ["France", "Italy", "Spain", "Germany", "Japan", "Egypt", "Canada", "Brazil", "Kenya", "Peru",
            "Chile", "India", "China", "Greece", "Norway", "Poland", "Mexico", "Cuba", "Iran", "Nepal"]


def prompt(client, request):
    return f"The capital of {SUBJECTS[client * REQUESTS + request]} is"


CLIENT = textwrap.dedent("""
    import glob
    import json
    import os
    import sys
    import time

    import nnsight
    import torch

    torch.set_num_threads(1)
    import lens_plugins as lp

    host, model_dir, prompts, out, package, clients = sys.argv[1:7]
    clients = int(clients)
    assert lp.__file__ == package, f"this client imported {lp.__file__}, the tests {package}"
    nnsight.CONFIG.API.HOST = host
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    model = lp.nnsight.remote_model(model_dir)
    # A barrier: every client is up before any sends, so the requests overlap on the server.
    open(out + ".ready", "w").close()
    deadline = time.time() + 300
    while len(glob.glob(os.path.join(os.path.dirname(out), "*.ready"))) < clients and time.time() < deadline:
        time.sleep(0.1)
    results = {}
    for prompt in json.loads(prompts):
        with model.trace(prompt, remote=True):
            lens = lp.nnsight.logit_lens(model, top_k=5)
        results[prompt] = lens
    torch.save(results, out)
""")


def test_four_clients_five_requests_each(model, ndif, smollm2_dir, tmp_path):
    # The same lens_plugins as this process (the wheel's install), whatever the working directory.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(lp.__file__).parents[1]))
    clients = [
        subprocess.Popen([sys.executable, "-P", "-c", CLIENT, ndif["host"], smollm2_dir,
                          json.dumps([prompt(c, r) for r in range(REQUESTS)]), str(tmp_path / f"client{c}.pt"),
                          lp.__file__, str(CLIENTS)], env=env, cwd=tmp_path)
        for c in range(CLIENTS)
    ]
    try:
        codes = [c.wait(timeout=600) for c in clients]
    finally:
        for c in clients:  # ours, by their Popen handles: none outlives the test
            if c.poll() is None:
                c.kill()
                c.wait()
    assert codes == [0] * CLIENTS
    for c in range(CLIENTS):
        results = torch.load(tmp_path / f"client{c}.pt", weights_only=False)
        assert list(results) == [prompt(c, r) for r in range(REQUESTS)]
        for text, remote in results.items():
            with model.trace(text):
                local = lp.nnsight.logit_lens(model, top_k=5)
            assert_identical(remote, local, text)
            ids = lp.nnsight.logit_lens_result(remote, model).token_ids[0].tolist()
            assert ids == model.tokenizer(text)["input_ids"]  # its own prompt, not another client's
