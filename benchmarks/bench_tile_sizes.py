"""Does the CPU readout's tile size need tuning per machine (issue 31, item 4)?

Times ``core.readout.lens_statistics`` (default reductions, one target per token) on SmolLM2-135M's real
residual rows (31 rows x 256 tokens) with vocabulary chunks of 256 to 2,048 columns, so tiles of 1 to 8 million
logits (4 to 32 MB per tile-sized buffer; the default is 512 columns), in one process per cell so that every size
sees the same load, the order rotating between rounds, medians. The cells are those of
``bench_cpu_robustness.py``: this machine's instruction sets and an AVX2-only CPU's emulated, with 1 and 2
threads. A size that wins by a margin in one cell and loses in another would call for a size measured per
machine; a flat row says the default holds wherever the three tile-sized buffers fit the last-level cache.

    python benchmarks/bench_tile_sizes.py [--rounds 3] [--widths 256 512 1024 2048] [--cells native:1 avx2:2 ...]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(widths, rounds):
    """One cell, in this process: ``{width: median seconds}`` and the loads seen."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_cost_growth import smollm2_stack_and_decoder

    from lens_plugins.core import readout

    torch.set_grad_enabled(False)
    stack, decoder = smollm2_stack_and_decoder()
    tokens = stack.shape[1]
    targets = torch.randint(0, decoder.W_U.shape[1], (tokens, 1), generator=torch.Generator().manual_seed(1))
    default_width, token_chunk = readout.tile_sizes(stack.device, stack.shape[0], tokens, decoder.W_U.shape[1])
    readout.lens_statistics(stack, decoder, 5, targets)  # warm: allocator, oneDNN primitives
    times, loads = {w: [] for w in widths}, []
    for r in range(rounds):
        order = widths[r % len(widths):] + widths[:r % len(widths)]
        for w in order:
            start = time.perf_counter()
            readout.lens_statistics(stack, decoder, 5, targets, vocab_chunk=w, token_chunk=token_chunk)
            times[w].append(time.perf_counter() - start)
            loads.append(os.getloadavg()[0])
    return {"medians": {w: statistics.median(t) for w, t in times.items()}, "default": default_width,
            "token_chunk": token_chunk, "rows": stack.shape[0], "threads": torch.get_num_threads(),
            "loads": [min(loads), max(loads)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--cells", nargs="+", default=["native:1", "native:2", "avx2:1", "avx2:2"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.widths, args.rounds)))
        return
    sys.path.insert(0, str(HERE))
    from bench_cpu_robustness import CONFIGS
    from bench_logit_lens import cpu_model

    print(f"# {cpu_model()}; SmolLM2-135M, 31 rows x 256 tokens; medians of {args.rounds} rounds per figure, "
          f"one process per cell")
    print("| instruction sets | threads | " + " | ".join(f"{w} columns" for w in args.widths) + " | load average |")
    print("| --- | ---: |" + " ---: |" * len(args.widths) + " --- |")
    for cell in args.cells:
        config, threads = cell.split(":")
        env = {k: v for k, v in os.environ.items() if k not in CONFIGS["avx2"]}
        env.update(CONFIGS[config], OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_OFFLINE="1")
        out = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(args.rounds),
                              "--widths", *map(str, args.widths)], env=env, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        med = {int(w): t for w, t in r["medians"].items()}
        base = med.get(r["default"])
        cells = [f"{t:.2f} s" + (f" ({t / base:.2f}x)" if base else "") + (" (default)" if w == r["default"] else "")
                 for w, t in sorted(med.items())]
        print(f"| {config} | {threads} | " + " | ".join(cells) + f" | {r['loads'][0]:.1f}-{r['loads'][1]:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
