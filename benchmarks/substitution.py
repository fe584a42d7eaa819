"""Sublayer substitution on SmolLM2-135M (Din et al. 2024, "Jump to Conclusions", sub-modules): replace one
block's attention or MLP contribution by its least-squares linear shortcut from the sublayer's input residual,
run the rest of the model, and measure the share of the model's final top-1 predictions retained (and the
mean KL from the clean final distribution), per block, attention vs MLP.

The built-in corpus's documents are split 60/40 (seeded, as in ``early_exit.py``): the shortcuts are fitted on
``--fit-blocks`` blocks of 128 tokens of the training part; the substitution runs on ``--prompts`` windows of
``--tokens`` tokens of the held-out part (nnsight trace; position 0, the attention sink, neither fitted nor
substituted).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/substitution.py [--prompts 8 --tokens 48 --fit-blocks 16]``
"""

import argparse
import random
import time

from lens_plugins.backends import nnsight as lpn
from lens_plugins.methods import substitution as sub
from lens_plugins.models import default_model_dir, load_hf_model
from lens_plugins.training import loop as train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--fit-blocks", type=int, default=16)
    parser.add_argument("--ridge", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--html", default=None, help="write the figure here")
    args = parser.parse_args()
    start = time.time()
    hf, tokenizer = load_hf_model(default_model_dir())
    model = lpn.wrap_model(hf, tokenizer)
    rng = random.Random(args.seed)
    docs = train.builtin_corpus()
    order = list(range(len(docs)))
    rng.shuffle(order)
    cut = int(0.6 * len(docs))
    train_docs, held_docs = [docs[i] for i in order[:cut]], [docs[i] for i in order[cut:]]
    t0 = time.time()
    shortcuts = sub.fit_sublayer_shortcuts(hf, train.token_blocks(train_docs, tokenizer, 128),
                                           max_blocks=args.fit_blocks, ridge=args.ridge)
    print(f"shortcuts fitted on {shortcuts.tokens} tokens ({args.fit_blocks} x 128, position 0 left out), "
          f"ridge {args.ridge}: {time.time() - t0:.0f} s", flush=True)
    held = train.token_blocks(held_docs, tokenizer, args.tokens)
    prompts = [tokenizer.decode(held[i]) for i in sorted(rng.sample(range(len(held)), args.prompts))]
    t0 = time.time()
    result = sub.sublayer_substitution(model, shortcuts, prompts)
    print(f"substitution: {len(result.layers) * len(result.sublayers)} substitutions x {args.prompts} prompts "
          f"({result.tokens} held-out positions): {time.time() - t0:.0f} s\n", flush=True)
    retained, kl = result.retained(), result.kl.mean(-1)
    print("| block | retained, attention | retained, MLP | KL attention (nats) | KL MLP (nats) | R^2 attention | R^2 MLP |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, layer in enumerate(result.layers):
        print(f"| {layer} | {retained[i, 0]:.3f} | {retained[i, 1]:.3f} | {kl[i, 0]:.3f} | {kl[i, 1]:.3f} | "
              f"{shortcuts.r2[i, 0]:.3f} | {shortcuts.r2[i, 1]:.3f} |")
    print(f"| mean | {retained[:, 0].mean():.3f} | {retained[:, 1].mean():.3f} | {kl[:, 0].mean():.3f} | "
          f"{kl[:, 1].mean():.3f} | {shortcuts.r2[:, 0].mean():.3f} | {shortcuts.r2[:, 1].mean():.3f} |")
    better = int((retained[:, 0] > retained[:, 1]).sum())
    worse = int((retained[:, 0] < retained[:, 1]).sum())
    print(f"\nattention retains more than the MLP in {better} blocks, less in {worse}, "
          f"as much in {len(result.layers) - better - worse}")
    if args.html:
        result.plot().write_html(args.html, include_plotlyjs="cdn")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
