"""Jump to conclusions on SmolLM2-135M: precision@1 and surprisal of the identity (logit lens) and of the
least-squares shortcut per row on held-out text, and the early-exit curve of each (layers saved at 95%
accuracy retention, where "accuracy" is agreement with the model's own top-1).

The built-in corpus's documents are split 60/40 (seeded, as in ``anomaly_auroc.py``): the shortcut maps are
fitted on ``--fit-blocks`` blocks of 128 tokens of the training part; the evaluation reads ``--prompts``
windows of ``--tokens`` tokens of the held-out part, every ``--row-stride``-th row (the last always). A
trained tuned lens can be added with ``--tuned PATH``; none was trained for this run (one KL step costs
about a minute on the shared 2-core CPU this was measured on).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/early_exit.py [--prompts 8 --tokens 48]``
"""

import argparse
import random
import time

from lens_plugins.backends import nnsight as lpn
from lens_plugins.lenses.affine import LogitLens
from lens_plugins.lenses.tuned import TunedLens
from lens_plugins.methods.early_exit import (
    REDUCTIONS,
    early_exit,
    fit_shortcuts,
    shortcut_scores,
)
from lens_plugins.models import default_model_dir, load_hf_model
from lens_plugins.training import loop as train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--fit-blocks", type=int, default=16)
    parser.add_argument("--row-stride", type=int, default=2)
    parser.add_argument("--tuned", default=None)
    parser.add_argument("--seed", type=int, default=0)
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
    lenses = {"identity (logit lens)": LogitLens(),
              "least-squares shortcut": fit_shortcuts(hf, train.token_blocks(train_docs, tokenizer, 128),
                                                      max_blocks=args.fit_blocks)}
    print(f"shortcut fit on {args.fit_blocks} x 128 tokens: {time.time() - t0:.0f} s", flush=True)
    if args.tuned:
        lenses[f"tuned lens ({args.tuned})"] = TunedLens.load(args.tuned, hf)
    held = train.token_blocks(held_docs, tokenizer, args.tokens)
    picks = sorted(rng.sample(range(len(held)), args.prompts))
    prompts = [tokenizer.decode(held[i]) for i in picks]
    n_rows = hf.config.num_hidden_layers + 1
    layers = list(range(0, n_rows, args.row_stride))
    layers = layers if layers[-1] == n_rows - 1 else layers + [n_rows - 1]
    results = {}
    for name, lens in lenses.items():
        t0 = time.time()
        results[name] = lpn.run_logit_lens(model, prompts, layers=layers, top_k=1, reductions=list(REDUCTIONS),
                                           padding_side="left", lens=lens)
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    scores = shortcut_scores(results)
    print(f"\n{scores.tokens} held-out tokens ({args.prompts} prompts of {args.tokens} tokens), rows {layers}; "
          f"total {time.time() - start:.0f} s\n")
    table = scores.to_dataframe().pivot(index="row", columns="lens", values=["precision_at_1", "surprisal"])
    table = table.reindex(scores.labels)
    print("| row | " + " | ".join(f"P@1 {n}" for n in lenses) + " | " + " | ".join(f"surprisal {n}" for n in lenses) + " |")
    print("| --- " * (1 + 2 * len(lenses)) + "|")
    for row in scores.labels:
        cells = [f"{table.loc[row, ('precision_at_1', n)]:.3f}" for n in lenses]
        cells += [f"{table.loc[row, ('surprisal', n)]:.2f}" for n in lenses]
        print(f"| {row} | " + " | ".join(cells) + " |")
    print("\n| lens | criterion | layers saved at 95% retention | at 90% | at 99% |")
    print("| --- | --- | --- | --- | --- |")
    for name, result in results.items():
        for criterion in ("prob", "entropy"):
            curve = early_exit(result, criterion=criterion)
            print(f"| {name} | {criterion} | {curve.layers_saved_at(0.95):.1%} | {curve.layers_saved_at(0.90):.1%} | "
                  f"{curve.layers_saved_at(0.99):.1%} |")


if __name__ == "__main__":
    main()
