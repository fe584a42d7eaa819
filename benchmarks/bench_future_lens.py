"""Future Lens on SmolLM2-135M: per source row and per N, top-1 agreement with the model's own prediction of
token t+N (its argmax at position t+N-1) on held-out text, next to a bigram baseline.

Training uses ``lens_plugins.training.loop`` (the tuned-lens recipe: SGD with Nesterov momentum, linear decay) on the
offline ``pydoc_data.topics`` corpus cut into 32-token blocks, 10% held out; a short run sized for a 2-core
CPU (``--steps``), so the maps are far from converged: a measurement of this run, not of the method's ceiling.
The bigram baseline predicts token t+N as the token seen most often N positions after token t in the
training split. The untrained lens (identity maps: the logit lens read as a prediction of t+N) is shown too.

Run: ``HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_future_lens.py [--steps 20]``
"""

import argparse
import sys
import time

import torch

from lens_plugins.lenses import future as fl
from lens_plugins.training import loop as train
from lens_plugins.models import default_model_dir, load_hf_model

LAYERS = ["embed", "8_pre", "16_pre", "24_pre", "29_post"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--heldout-blocks", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_hf_model(default_model_dir())
    config = train.TrainConfig(steps=args.steps, batch_size=2, seed=0)
    started = time.time()
    rows = {}
    for n in args.n:
        lens, history, held, train_blocks = fl.train_future_lens(model, tokenizer, n, layers=LAYERS, seq_len=32,
                                                                 config=config)
        held = held[: args.heldout_blocks]
        bigram = fl.bigram_table(train_blocks, n, model.config.vocab_size)
        trained = fl.evaluate(lens, model, held, bigram=bigram)
        identity = fl.evaluate(fl.FutureLens(lens.d_model, lens.labels, n), model, held)
        rows[n] = (trained, identity)
        print(f"# N={n}: loss {history[0]['loss']:.2f} -> {history[-1]['loss']:.2f} over {len(history)} steps, "
              f"{trained.n_tokens} held-out positions, {time.time() - started:.0f} s", file=sys.stderr)
    n_tokens = {n: rows[n][0].n_tokens for n in rows}
    print(f"Top-1 agreement with SmolLM2-135M-Instruct's own prediction of token t+N, held-out pydoc text "
          f"({', '.join(f'N={n}: {k} positions' for n, k in n_tokens.items())}); {args.steps} training steps of "
          f"2 x 32 tokens per N; trained map / identity map (logit lens) ({time.time() - started:.0f} s):\n")
    print("| source row | " + " | ".join(f"N={n}" for n in rows) + " |")
    print("| --- | " + " | ".join("---" for _ in rows) + " |")
    for r, label in enumerate(LAYERS):
        cells = [f"{rows[n][0].top1[r]:.2f} / {rows[n][1].top1[r]:.2f}" for n in rows]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| bigram baseline | " + " | ".join(f"{rows[n][0].bigram_top1:.2f}" for n in rows) + " |")
    print("\nHeld-out KL(model || lens), nats, trained / identity:\n")
    print("| source row | " + " | ".join(f"N={n}" for n in rows) + " |")
    print("| --- | " + " | ".join("---" for _ in rows) + " |")
    for r, label in enumerate(LAYERS):
        print(f"| {label} | " + " | ".join(f"{rows[n][0].kl[r]:.2f} / {rows[n][1].kl[r]:.2f}" for n in rows) + " |")


if __name__ == "__main__":
    main()
