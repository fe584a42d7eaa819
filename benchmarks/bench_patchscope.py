"""Precision@1 of the token-identity Patchscope and of the logit lens, per source layer, on SmolLM2-135M.

For each prompt of a fixed set and each of its positions (after the first), each source row's hidden state
is decoded two ways: by the logit lens (final norm and unembedding) and by the identity Patchscope (written
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
    "Water boils at one hundred degrees Celsius at sea level.",
    "The quick brown fox jumps over the lazy dog.",
    "Monday, Tuesday, Wednesday, Thursday, Friday",
    "The largest planet in our solar system is Jupiter.",
    "To make a cake you need flour, sugar, eggs and butter.",
]


def main(every: int = 3) -> None:
    torch.manual_seed(0)
    model = lp.load_default_model(backend="nnsight")
    started = time.time()
    patch_hits = lens_hits = None
    n = 0
    for prompt in PROMPTS:
        ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
        positions = list(range(1, ids.shape[1]))
        lens = lp.nnsight.run_logit_lens(model, prompt, positions=positions, top_k=1,
                                         reductions=["top_k", "final_top1"])
        scope = lp.patchscope(model, ids, positions=positions, top_k=1, reductions=["top_k", "final_top1"],
                              batch_size=64)
        assert scope.labels == lens.labels and torch.equal(scope.final_top1, lens.final_top1)
        hits_p = scope.top1_agreement().sum((1, 2))
        hits_l = lens.top1_agreement().sum((1, 2))
        patch_hits = hits_p if patch_hits is None else patch_hits + hits_p
        lens_hits = hits_l if lens_hits is None else lens_hits + hits_l
        n += len(positions)
        print(f"# {prompt[:40]!r}: {len(positions)} positions, {time.time() - started:.0f} s", file=sys.stderr)
    labels = lens.labels
    print(f"Precision@1 against the model's own next-token prediction, SmolLM2-135M-Instruct, "
          f"{len(PROMPTS)} prompts, {n} positions ({time.time() - started:.0f} s):\n")
    print("| source row | identity Patchscope | logit lens |")
    print("| --- | --- | --- |")
    for r, label in enumerate(labels):
        if r % every == 0 or r >= len(labels) - 2:
            print(f"| {label} | {patch_hits[r] / n:.2f} | {lens_hits[r] / n:.2f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
