"""The GPU benchmark runs: no GPU is at hand in CI, so its CPU mode at small shapes is run here, through the
same code a GPU run takes (forward pass of a random Llama, floors, every precision the device has, the naive
readout), and its own cross-check (float32 lens against the naive readout) is held to float32 rounding."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_at_small_shapes_on_a_cpu():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu_readout.py"), "--device", "cpu", "--rows", "5",
         "--tokens", "16", "--d-model", "256", "--vocab", "3000", "--repeats", "1", "--markdown"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    # Entropies of about 8 nats over 3,000 columns: float32 rounding is ~1e-6; a wrong readout is off by far more.
    diff = float(re.search(r"float32 lens vs naive readout: max entropy difference (\S+)", out.stdout).group(1))
    assert diff < 1e-4
    table = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert {"float32", "bf16x3", "naive (float32, 4 rows at a time)"} <= set(table)
    assert "tf32" not in table  # a CUDA format: not offered on a CPU
    bf16x3_entropy_diff = float(table["bf16x3"].split("|")[6])
    assert bf16x3_entropy_diff < 1e-3  # a fast precision mode must keep entropy within 1e-3 nats of float32
