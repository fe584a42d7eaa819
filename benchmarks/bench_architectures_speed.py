"""Did structure discovery and verification at first use (issue 28) slow the one-call lens on SmolLM2?

The one-call lens (``lp.nnsight.run_logit_lens`` and ``lp.transformer_lens.run_logit_lens`` on the prompt
below) in a fresh process per measurement, model loaded untimed: the **first call** (it includes the
verification forward at first use, once per model class: ``core.verification`` on nnsight,
``backends/transformer_lens/verification.py`` on TransformerLens) and the **steady state** (median of
three later calls). Each round runs both trees, this one and ``--old`` (a checkout of the commit before
discovery and verification were merged), alternating which goes first; the figures are medians over rounds.

    git worktree add /tmp/arch-old 90dc69b
    python benchmarks/bench_architectures_speed.py --old /tmp/arch-old [--rounds 5]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
PROMPT = "The Eiffel Tower is in the city of"
ONE = r"""
import json, os, statistics, sys, time
sys.path.insert(0, os.getcwd())
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import lens_plugins as lp
from lens_plugins.models import load_default_model
backend, prompt = sys.argv[1], sys.argv[2]
model = load_default_model(backend)
run = getattr(lp, backend).run_logit_lens
start = time.perf_counter(); first = run(model, prompt, top_k=5); first_s = time.perf_counter() - start
steady = []
for _ in range(3):
    start = time.perf_counter(); again = run(model, prompt, top_k=5); steady.append(time.perf_counter() - start)
assert torch.equal(first.top_ids, again.top_ids)
print(json.dumps({"file": lp.__file__, "first": first_s, "steady": statistics.median(steady),
                  "top1": first.top_ids[-1, 0, -1, 0].item()}))
"""


def one(tree, backend):
    out = subprocess.run([sys.executable, "-c", ONE, backend, PROMPT], cwd=tree, capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"), check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(str(tree)), (result["file"], tree)  # the tree asked for was imported
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="a checkout of the commit before discovery/verification")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", nargs="*", default=["nnsight", "transformer_lens"])
    args = parser.parse_args()
    trees = {"new": HERE, "old": Path(args.old).resolve()}
    runs = {(t, b): [] for t in trees for b in args.backends}
    started = time.time()
    for round_ in range(args.rounds):
        order = ["new", "old"] if round_ % 2 == 0 else ["old", "new"]
        for backend in args.backends:
            for tree in order:
                result = one(trees[tree], backend)
                runs[tree, backend].append(result)
                print(f"round {round_} {backend:16s} {tree}: first {result['first']:.3f} s, steady "
                      f"{result['steady']:.3f} s, top-1 {result['top1']}", file=sys.stderr, flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpu import cpu_description

    print(f"# {cpu_description()}; torch threads as set by the environment (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}), load average at the end {os.getloadavg()}")
    print(f"prompt {PROMPT!r}, {args.rounds} rounds, {time.time() - started:.0f} s in all")
    for backend in args.backends:
        for what in ("first", "steady"):
            new = statistics.median(r[what] for r in runs["new", backend])
            old = statistics.median(r[what] for r in runs["old", backend])
            print(f"{backend:16s} {what:6s} call: before {old:.3f} s, now {new:.3f} s (x{new / old:.2f})")
        assert {r["top1"] for r in runs["new", backend]} == {r["top1"] for r in runs["old", backend]}


if __name__ == "__main__":
    main()
