"""Held-out KL(final || lens) per row, pre / mid / post, on SmolLM2-135M: the logit lens, a tuned lens whose
ordinary and mid-block translators are trained together for the same steps, and a Jacobian lens with
mid-block matrices fitted for a handful of blocks (issue 29, item 3).

Recipe (CPU-sized; every number below is an argument):
- text: the built-in corpus in ``--seq-len``-token blocks, 10% held out with seed 0 (``TunedLens.train``'s split);
- tuned lens: ``TunedLens.train(model, None, resid_mid=True, init="shortcut", shortcut_blocks=..., steps=...,
  matmul_dtype=...)``: every translator (the 30 hidden states' and the 30 mid rows') starts at its
  least-squares map and takes the same KL steps;
- Jacobian lens: ``JacobianLens.fit(model, train_blocks[:prompts, :jacobian_tokens], source_layers=...,
  mid_layers=...)`` on training blocks, for the blocks ``--blocks`` (for block ``l``: ``J[l-1]`` reads row
  ``l_pre``, ``J_mid[l]`` row ``l_mid``, ``J[l]`` row ``l_post`` = ``(l+1)_pre``);
- evaluation: ``evaluate_lenses(model, heldout[:eval_blocks], [...], resid_mid=True, layers=<those blocks' pre, mid
  and post rows>)``, every position of every held-out block.

Run: ``OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 nice -n 19 .venv/bin/python benchmarks/midblock_kl.py``; the log goes to
``benchmarks/results_2026-12-02_midblock_kl.log`` (``--log``).
"""

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch


def labels(block: int, n_layers: int) -> list[str]:
    """Block ``block``'s input, mid point and output, as row labels (its output is the next block's input)."""
    return [f"{block}_pre", f"{block}_mid", f"{block + 1}_pre" if block + 1 < n_layers else f"{block}_post"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--shortcut-blocks", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--matmul-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--blocks", type=int, nargs="+", default=[20, 28])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--jacobian-tokens", type=int, default=40)
    parser.add_argument("--eval-blocks", type=int, default=1)
    parser.add_argument("--log", default=str(Path(__file__).with_name("results_2026-12-02_midblock_kl.log")))
    args = parser.parse_args()

    import lens_plugins as lp
    from lens_plugins.methods.evaluate import evaluate_lenses
    from lens_plugins.core.rows import plan
    from lens_plugins.models import load_default_model
    from lens_plugins.training import loop
    from lens_plugins.training.tuned_lens import token_blocks_of

    lines = []

    def log(text=""):
        print(text, flush=True)
        lines.append(text)

    def cpu():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    log(f"# midblock_kl: {' '.join(sys.argv)}")
    log(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS')}, load average at start {os.getloadavg()}")
    torch.manual_seed(0)
    model = load_default_model("nnsight")
    n_layers = model._module.config.num_hidden_layers

    blocks = token_blocks_of(model, None, args.seq_len)
    train_blocks, heldout = loop.split_heldout(blocks, 0.1, 0)
    log(f"# corpus: {blocks.shape[0]} blocks of {args.seq_len} tokens, {heldout.shape[0]} held out (seed 0)")

    wall, used = time.perf_counter(), cpu()
    tuned = lp.TunedLens.train(model, None, seq_len=args.seq_len, resid_mid=True, init="shortcut",
                               shortcut_blocks=args.shortcut_blocks, steps=args.steps,
                               matmul_dtype=getattr(torch, args.matmul_dtype),
                               seed=0, heldout=0.1)
    assert torch.equal(tuned.heldout_blocks, heldout)
    log(f"tuned lens (pre+mid, shortcut start on {args.shortcut_blocks} blocks, {args.steps} KL steps of 1 block, "
        f"{args.matmul_dtype} matmuls): {time.perf_counter() - wall:.0f} s wall, {cpu() - used:.0f} s CPU")

    sources = sorted({b - 1 for b in args.blocks} | set(args.blocks))
    wall, used = time.perf_counter(), cpu()
    jacobian = lp.JacobianLens.fit(model, train_blocks[:args.prompts, :args.jacobian_tokens], source_layers=sources,
                                   mid_layers=args.blocks, progress=False, max_prompts=None)
    log(f"Jacobian lens ({args.prompts} training prompts x {args.jacobian_tokens} tokens, skip_first 16, "
        f"J for blocks {sources}, J_mid for blocks {args.blocks}): {time.perf_counter() - wall:.0f} s wall, "
        f"{cpu() - used:.0f} s CPU")

    wall, used = time.perf_counter(), cpu()
    rows = sorted({label for block in args.blocks for label in labels(block, n_layers)},
                  key=lambda label: [row.label for row in plan(n_layers, resid_mid=True)].index(label))
    scores = evaluate_lenses(model, heldout[:args.eval_blocks], [lp.LogitLens(), tuned, jacobian],
                             names=["logit", "tuned", "jacobian"], resid_mid=True, layers=rows)
    log(f"evaluation ({args.eval_blocks} held-out blocks, {scores.tokens} tokens, rows {rows} and the final one): "
        f"{time.perf_counter() - wall:.0f} s wall, {cpu() - used:.0f} s CPU")
    kl = scores.table("kl")
    log()
    log("## every row, KL(final || lens) in nats (NaN: the lens has no map for that row)")
    log(kl.to_string(float_format=lambda v: f"{v:.3f}"))
    log()
    log("## per block: KL at the block's input (pre), between attention and MLP (mid), output (post)")
    log("| block | row | KL logit lens | KL tuned lens (pre+mid) | KL Jacobian lens |")
    log("| --- | --- | --- | --- | --- |")
    for block in args.blocks:
        for label in labels(block, n_layers):
            row = kl.loc[label]
            shown = f"{block}_post (= {label})" if label.endswith("_pre") and not label.startswith(f"{block}_") else label
            log(f"| {block} | {shown} | {row['logit']:.3f} | {row['tuned']:.3f} | {row['jacobian']:.3f} |")
    Path(args.log).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
