"""A real NDIF server (ndif 0.1.2, CPU, loopback) for the whole session, and the client set up to use it.

``make test-ndif`` runs this suite with lens_plugins installed from a built wheel (not the checkout) and
starts nothing itself: the ``ndif`` session fixture runs ``ndif_local/up.sh`` and always runs ``down.sh``
afterwards, whatever happened. ``LP_NDIF_REUSE=1`` uses a server already started with ``make ndif-up``
(and leaves it running), for quick iterations.

The client runs torch on one thread, like the server's model actor, so remote and local results are
bit-identical (the reduction order of a matmul depends on the thread count).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models only; tests/ holds no package of ours

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A short execution cap, so the timeout test waits seconds rather than minutes; every other job takes ~1 s.
os.environ.setdefault("NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS", "20")

import torch  # noqa: E402

torch.set_num_threads(1)

import lens_plugins as lp  # noqa: E402


def _client_is_the_wheel():
    where = Path(lp.__file__).resolve()
    if "site-packages" not in where.parts or ROOT / "lens_plugins" == where.parent:
        pytest.exit(
            f"tests_ndif needs lens_plugins installed from a wheel, not {where}; run `make test-ndif`",
            returncode=4,
        )


_client_is_the_wheel()


def _env():
    """ndif_local/env.sh's variables, as the scripts see them."""
    out = subprocess.run(
        ["bash", "-c", f"set -a && source {ROOT}/ndif_local/env.sh && env -0"], capture_output=True, check=True
    ).stdout
    return dict(line.split("=", 1) for line in out.decode().split("\0") if "=" in line)


@pytest.fixture(scope="session")
def ndif():
    """The local server's settings (``host``, ports, state dir); started here and always stopped."""
    import nnsight

    env = _env()
    reuse = os.environ.get("LP_NDIF_REUSE") == "1"
    if not reuse:
        up = subprocess.run([str(ROOT / "ndif_local/up.sh")], capture_output=True, text=True, timeout=300)
        if up.returncode != 0:
            subprocess.run([str(ROOT / "ndif_local/down.sh")], timeout=120)
            pytest.fail(f"ndif_local/up.sh failed:\n{up.stdout}\n{up.stderr}", pytrace=False)
    host = f"http://127.0.0.1:{env['NDIF_API_PORT']}"
    nnsight.CONFIG.API.HOST = host
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    try:
        yield {"host": host, "env": env, "state": Path(env["NDIF_LOCAL_STATE"])}
    finally:
        if not reuse:
            subprocess.run([str(ROOT / "ndif_local/down.sh")], timeout=120)


@pytest.fixture(scope="session")
def smollm2_dir():
    from lens_plugins.models import default_model_dir

    return str(default_model_dir())


@pytest.fixture(scope="session")
def model(ndif, smollm2_dir):
    """SmolLM2-135M as an NDIF user makes it: a local directory as the repo id, weights not loaded here.
    ``remote=False`` traces load them locally on first use, from the same files the server loads."""
    return lp.nnsight.remote_model(smollm2_dir)
