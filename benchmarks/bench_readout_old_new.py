"""The streamed readout of this tree against another checkout's, in one process, alternating, medians.

Times ``core.readout.lens_statistics`` (default reductions, one target per token) on SmolLM2-135M's real
residual rows (31 rows; the built-in corpus, repeated along tokens to reach ``--tokens``) with this tree's
readout and with ``--old``'s (a path to another checkout, e.g. ``git worktree add /tmp/old main``), the order
alternating between rounds. A change that should cost nothing (issue 31, item 3: compensated sums) is checked
this way: one process, same data, same load.

    python benchmarks/bench_readout_old_new.py --old /tmp/old [--tokens 128] [--rounds 6]
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="root of the other checkout")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    import torch
    from bench_cost_growth import smollm2_stack_and_decoder
    from cpu import cpu_description

    from lens_plugins.core import readout as new

    spec = importlib.util.spec_from_file_location("old_readout", os.path.join(args.old, "lens_plugins/core/readout.py"))
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    base, decoder = smollm2_stack_and_decoder()
    stack = base.repeat(1, -(-args.tokens // base.shape[1]), 1)[:, :args.tokens].contiguous()
    targets = torch.randint(0, decoder.W_U.shape[1], (args.tokens, 1), generator=torch.Generator().manual_seed(1))
    print(f"CPU: {cpu_description()}; load average at start {os.getloadavg()}")
    times = {"old": [], "new": []}
    for r in range(args.rounds):
        for name, module in (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old)):
            start = time.perf_counter()
            module.lens_statistics(stack, decoder, 5, targets)
            times[name].append(time.perf_counter() - start)
            print(f"round {r} {name}: {times[name][-1]:.3f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    o, n = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"tokens={args.tokens}: old median {o:.3f} s, new median {n:.3f} s, new/old {n / o:.3f}; "
          f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
