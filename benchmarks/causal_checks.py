"""Causal checks of lenses on SmolLM2-135M (Belrose et al. 2023): the causal basis of the logit lens, a
least-squares tuned lens (``fit_shortcuts``: closed form, not KL-trained), with ``--tuned-steps N`` a tuned lens
KL-trained as Belrose et al. train it (``TunedLens.train``, from the least-squares start, on the training part
only), and a Jacobian lens (fitted here on a few prompts) at one residual row, then the subspace-ablation experiment: mean-ablate each basis, and ``k``
random orthonormal directions as the control, at that row in the model (nnsight trace), and compare the
effect on the model's final distribution with the effect on the lens's own prediction.

The built-in corpus's documents are split 60/40 (seeded): the lenses and the bases are fitted on the first
part, the ablation runs on ``--prompts`` windows of the second.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/causal_checks.py [--row 15_pre --k 4 --steps 15]
[--tuned-steps 48]``
"""

import argparse
import random
import time

import torch

from lens_plugins.backends import nnsight as lpn
from lens_plugins.core.rows import Row
from lens_plugins.lenses.affine import LogitLens
from lens_plugins.lenses.jacobian import JacobianLens
from lens_plugins.lenses.tuned import TunedLens
from lens_plugins.methods import causal_checks as cc
from lens_plugins.methods.early_exit import fit_shortcuts
from lens_plugins.models import default_model_dir, load_hf_model
from lens_plugins.training import loop as train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--row", default="15_pre")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--jacobian-prompts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tuned-steps", type=int, default=0,
                        help="also a KL-trained tuned lens: this many steps of one 128-token block (0: none)")
    parser.add_argument("--html", default=None)
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
    fit_blocks = train.token_blocks(train_docs, tokenizer, 48)
    t0 = time.time()
    shortcut = fit_shortcuts(hf, fit_blocks, max_blocks=8)
    print(f"least-squares tuned lens on 8 x 48 tokens: {time.time() - t0:.0f} s", flush=True)
    t0 = time.time()
    layer = Row.parse(args.row).hidden_index - 1  # the block whose output the row is
    texts = [" ".join(d.split())[:300] for d in train_docs[:args.jacobian_prompts]]
    jacobian = JacobianLens.fit(model, texts, source_layers=[layer], max_seq_len=32, progress=False)
    print(f"Jacobian lens (block {layer}) on {args.jacobian_prompts} prompts: {time.time() - t0:.0f} s", flush=True)
    lenses = {"logit lens": LogitLens(), "tuned lens (least squares)": shortcut}
    if args.tuned_steps:
        t0 = time.time()
        trained = TunedLens.train(model, train_docs, seq_len=128, init="shortcut", shortcut_blocks=8,
                                  steps=args.tuned_steps, matmul_dtype=torch.bfloat16, seed=args.seed)
        lenses[f"tuned lens (KL, {args.tuned_steps} steps)"] = trained
        print(f"tuned lens, least-squares start then {args.tuned_steps} KL steps on the training part: "
              f"{time.time() - t0:.0f} s", flush=True)
    lenses["Jacobian lens"] = jacobian
    bases = {}
    for name, lens in lenses.items():
        t0 = time.time()
        basis = cc.causal_basis(model, lens, args.row, fit_blocks[8:], k=args.k, max_tokens=args.tokens,
                                steps=args.steps, seed=args.seed)
        bases[name] = (lens, basis)
        print(f"causal basis of the {name} at {args.row}: gains {[round(g, 3) for g in basis.gains.tolist()]} "
              f"on {basis.tokens} states, {time.time() - t0:.0f} s", flush=True)
    held = train.token_blocks(held_docs, tokenizer, 40)
    prompts = [tokenizer.decode(held[i]) for i in sorted(rng.sample(range(len(held)), args.prompts))]
    t0 = time.time()
    result = cc.subspace_ablation(model, bases, prompts, seed=args.seed)
    print(f"ablation on {args.prompts} prompts ({result.model_effect.shape[-1]} positions): {time.time() - t0:.0f} s\n")
    print(result.summary().to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\nmodel effect, causal basis / random:", [round(float(r), 1) for r in result.model_ratio()])
    if args.html:
        result.plot().write_html(args.html, include_plotlyjs="cdn")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
