"""The matmul benchmark behind the readout's choice of oneDNN runs, at small shapes, through the readout's own
``Unembedding`` with oneDNN on and off, and both libraries' products stay within float32 accumulation's bound
of a float64 product (a library that rounded its inputs to bfloat16 would be off by ~2^-9, far outside)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lens_plugins.core import readout

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_matmul.py"
SMALL = ["--vectors", "96", "--width", "64", "--d-model", "128", "--vocab", "1000", "--repeats", "1"]


NO_ONEDNN = pytest.mark.skipif(not readout.onednn_matmul(torch.device("cpu")), reason="oneDNN is used on x86 CPUs only")


@pytest.mark.parametrize("library", ["mkl", pytest.param("onednn", marks=NO_ONEDNN)])
def test_each_library_is_float32_exact(library):
    out = subprocess.run([sys.executable, str(SCRIPT), "--child", library, *SMALL],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert 0 <= result["max_error"] <= result["float32_bound"]
    assert result["float32_bound"] < 1e-4  # logits of size ~10 summed from 128 terms: 2^-24 scale, not bfloat16's


@NO_ONEDNN
def test_the_benchmark_prints_both_libraries_side_by_side():
    out = subprocess.run([sys.executable, str(SCRIPT), *SMALL, "--rounds", "1", "--markdown"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 4 and "MKL" in table[2] and "oneDNN" in table[3]  # header, rule, one row per library
    assert table[2].split("|")[4].strip() == "1.00x"  # ratios are to MKL's time
