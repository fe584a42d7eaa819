"""Cross-model Patchscopes on SmolLM2-135M reading itself across rows (the only real model available offline):
the held-out R^2 of the least-squares map from each source row to each target row, and the Patchscope's
precision@1 against the model's own next-token prediction, source row x target row (Ghandeharioun et al.
2024, section 5's heatmap, with one model as both source and target).

The built-in corpus's documents are split 60/40 (seeded): the maps are fitted on ``--pairs`` positions of
the first part (windows of 400 characters; the last 20% of windows held out for the R^2), the Patchscope is
scored on ``--prompts`` windows of ``--chars`` characters of the second part, written into the
token-identity prompt's last token. Rows: every ``--row-stride``-th (the last always).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cross_model.py [--prompts 6 --pairs 3000 --row-stride 5]``
"""

import argparse
import random
import time

import torch

from lens_plugins.backends import nnsight as lpn
from lens_plugins.methods import cross_model as cm
from lens_plugins.models import default_model_dir, load_hf_model
from lens_plugins.training import loop as train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--chars", type=int, default=160)
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--row-stride", type=int, default=5)
    parser.add_argument("--ridge", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--html", default=None, help="write the heatmap figure here")
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
    rows = list(range(0, hf.config.num_hidden_layers + 1, args.row_stride))
    t0 = time.time()
    fitted = cm.fit_mapping(model, model, train_docs, source_layers=rows, target_layers=rows, max_pairs=args.pairs,
                            ridge=args.ridge)
    print(f"fit: {fitted.pairs_kept} pairs ({fitted.heldout_pairs} held out) of {fitted.tokens} tokens, "
          f"{len(fitted.source_labels)} x {len(fitted.target_labels)} maps, ridge {args.ridge}: {time.time() - t0:.0f} s",
          flush=True)
    windows = [w for w in cm._windows(held_docs, args.chars) if len(w) > args.chars // 2]
    prompts = [windows[i] for i in sorted(rng.sample(range(len(windows)), args.prompts))]
    t0 = time.time()
    scores = cm.cross_model_scores(model, model, fitted, prompts)
    print(f"Patchscopes: {scores.positions} positions x {len(scores.source_labels)} x {len(scores.target_labels)}: "
          f"{time.time() - t0:.0f} s", flush=True)
    torch.set_printoptions(precision=2, linewidth=200)
    header = "| source \\ target | " + " | ".join(scores.target_labels) + " |"
    for name, values in (("precision@1", scores.precision_at_1), ("held-out R^2", scores.r2)):
        print(f"\n{name} (rows: source row, columns: target row)\n")
        print(header)
        print("|" + " --- |" * (len(scores.target_labels) + 1))
        for i, label in enumerate(scores.source_labels):
            print(f"| {label} | " + " | ".join(f"{float(v):.2f}" for v in values[i]) + " |")
    if args.html:
        scores.plot().write_html(args.html, include_plotlyjs="cdn")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
