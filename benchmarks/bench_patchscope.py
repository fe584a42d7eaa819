"""Precision@1 of the token-identity Patchscope and of the logit lens, per source layer, on SmolLM2-135M.

For each prompt of a fixed set and each of its last ``POSITIONS`` positions, each source row (every ``EVERY``-th
lens row and the last two; 16 of SmolLM2's 31) has its hidden state
decoded two ways: by the logit lens (final norm and unembedding) and by the identity Patchscope (written
into the paper's "cat->cat; 1135->1135; hello->hello; ?" prompt at the placeholder, at the same row, and read
there after the rest of the forward pass). Precision@1 is the fraction of (prompt, position) pairs whose top-1
equals the model's own next-token prediction at that position (``top1_agreement``). The output is the README
table. A measurement on this model and prompt set, not a reproduction of the paper's numbers.

Run: ``HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_patchscope.py`` (a few minutes on CPU).
"""

import sys
import time

import torch

import lens_plugins as lp

PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "The Eiffel Tower is located in the city of",
    "In 1905 Albert Einstein published four papers that changed physics.",
    "She opened the door, looked outside and saw that it was raining.",
    "def add(a, b):\n    return a + b",
    "Monday, Tuesday, Wednesday, Thursday, Friday",
    "The largest planet in our solar system is Jupiter.",
    "To make a cake you need flour, sugar, eggs and butter.",
]


POSITIONS = 3
EVERY = 2


def main() -> None:
    torch.manual_seed(0)
    model = lp.load_default_model(backend="nnsight")
    started = time.time()
    patch_hits = lens_hits = None
    n = 0
    for prompt in PROMPTS:
        ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
        positions = list(range(ids.shape[1] - POSITIONS, ids.shape[1]))
        keep = sorted(set(range(0, 31, EVERY)) | {29, 30})  # lens row indices, as patchscope(layers=) resolves them
        lens = lp.nnsight.run_logit_lens(model, prompt, positions=positions, top_k=1,
                                         reductions=["top_k", "final_top1"])
        scope = lp.patchscope(model, ids, layers=keep, positions=positions, top_k=1,
                              reductions=["top_k", "final_top1"], batch_size=32)
        assert scope.labels == [lens.labels[i] for i in keep] and torch.equal(scope.final_top1, lens.final_top1)
        hits_p = scope.top1_agreement().sum((1, 2))
        hits_l = lens.top1_agreement()[keep].sum((1, 2))
        patch_hits = hits_p if patch_hits is None else patch_hits + hits_p
        lens_hits = hits_l if lens_hits is None else lens_hits + hits_l
        n += len(positions)
        print(f"# {prompt[:40]!r}: {len(positions)} positions, {time.time() - started:.0f} s", file=sys.stderr)
    labels = scope.labels
    print(f"Precision@1 against the model's own next-token prediction, SmolLM2-135M-Instruct, "
          f"{len(PROMPTS)} prompts, {n} positions ({time.time() - started:.0f} s):\n")
    print("| source row | identity Patchscope | logit lens |")
    print("| --- | --- | --- |")
    for r, label in enumerate(labels):
        print(f"| {label} | {patch_hits[r] / n:.2f} | {lens_hits[r] / n:.2f} |")


if __name__ == "__main__":
    main()
