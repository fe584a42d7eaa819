"""The machine a benchmark ran on, named the way its results depend on it: CPU model, the vector
instruction sets torch's kernels dispatch on, thread count, and any override of that dispatch."""

import os
import subprocess

import torch

FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "f16c")
DISPATCH_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")


def cpu_description() -> str:
    """e.g. ``AMD EPYC 7B13 (avx2 fma f16c; torch capability AVX2; 2 threads)``."""
    model, flags = "unknown CPU", set()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.SubprocessError):
        pass
    present = " ".join(f for f in FLAGS_THAT_MATTER if f in flags) or "no flags read"
    overrides = [f"{v}={os.environ[v]}" for v in DISPATCH_VARIABLES if v in os.environ]
    capability = torch.backends.cpu.get_cpu_capability()
    extra = f"; {' '.join(overrides)}" if overrides else ""
    return f"{model} ({present}; torch capability {capability}; {torch.get_num_threads()} threads{extra})"
