"""Is the lens at most the floor on every CPU of the kind, with 1 and 2 threads (issue 31, item 4)?

``bench_logit_lens.py`` at 256 tokens (SmolLM2-135M, 31 rows, the full set of reductions; floor, this
package on a TransformerLens cache and in an nnsight trace, TransformerLens's own tool), once per
configuration: the instruction sets this machine's CPU has, and those of the other CPUs of the kind emulated
(``ATEN_CPU_CAPABILITY=avx2`` with ``MKL_ENABLE_INSTRUCTIONS=AVX2`` and ``ONEDNN_MAX_CPU_ISA=AVX2``: an AVX2-only
EPYC; ``ATEN_CPU_CAPABILITY=default``: no vector extensions in ATen's own kernels), with 1 and 2 threads, and
with 2 threads while another process keeps one core busy (``busy``: a spinning Python process started for the
cell and stopped after it, the shared machine the issue measured on, made reproducible). Every figure is a
median of fresh processes, alternating; each line names the CPU, the threads and the load average the
measurements saw, since on a shared machine that decides the ratios as much as the code does.

    python benchmarks/bench_cpu_robustness.py [--rounds 3] [--tokens 256] [--cells native:1 native:2 native:2:busy ...]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
APPROACHES = ["floor", "lens_plugins", "lens_plugins_nnsight", "transformer_lens_tool"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--cells", nargs="+", default=[f"{c}:{t}" for c in ("native", "avx2") for t in
                                                         ("1", "2", "2:busy")],
                        help="instruction sets (native, avx2, default) : threads [: busy]")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from bench_logit_lens import cpu_model

    print(f"# {cpu_model()}; {args.tokens} tokens; medians of {args.rounds} fresh-process rounds per figure")
    print("| instruction sets | threads | another process on a core | floor: first call | lens_plugins, TL cache "
          "(x floor) | lens_plugins, nnsight (x floor) | TransformerLens tool (x floor) | load average |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for cell in args.cells:
        config, threads, *busy = cell.split(":")
        env = {k: v for k, v in os.environ.items() if k not in CONFIGS["avx2"]}
        env.update(CONFIGS[config], OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            out = subprocess.run([sys.executable, str(HERE / "bench_logit_lens.py"), "--tokens", str(args.tokens),
                                  "--rounds", str(args.rounds), "--no-steady", "--approaches", *APPROACHES],
                                 env=env, capture_output=True, text=True, check=True)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        med = json.loads(out.stdout.strip().splitlines()[-1])[str(args.tokens)]
        floor = med["floor"]["first"]
        loads = [load for m in med.values() for load in m["loads"]]
        ratios = [f"{med[a]['first'] / floor:.2f}x" for a in APPROACHES[1:]]
        print(f"| {config} | {threads} | {'yes' if busy else 'no'} | {floor:.2f} s | " + " | ".join(ratios) +
              f" | {min(loads):.1f}-{max(loads):.1f} |", flush=True)


if __name__ == "__main__":
    main()
