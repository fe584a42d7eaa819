"""Bytes that come back from an nnsight trace: the in-trace lens vs the seed pattern.

The seed pattern saves every layer's softmax over the vocabulary (``[rows, tokens, vocab]`` probabilities)
and reduces it on the client; the lens reduces inside the trace and saves only ``O(rows x tokens x top_k)``.
For a remote 70B model the difference is the download, so it is what this measures:

- SmolLM2-135M at 256 tokens, measured: ``torch.save`` size of what each pattern saves (the seed pattern is
  measured on one layer and scaled by the row count, since 31 x 256 x 49152 floats is 1.6 GB);
- Llama-3.1-70B shapes (80 layers, vocab 128256) at 1024 tokens, computed from the same formula, which the
  SmolLM2 measurement checks.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_nnsight_bytes.py``
"""

import io
import time

import torch

TOP_K = 10
N_TARGETS = 1


def saved_bytes(value) -> int:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.tell()


def lens_bytes(rows: int, tokens: int, top_k: int = TOP_K, n_targets: int = N_TARGETS) -> int:
    """Tensor payload of a saved lens (pickle framing excluded): per row and token the top-k ids (int64) and
    log-probs, entropy, two KLs, the final top-1's log-prob and rank, and for the next token and each target
    a log-prob and rank; per token the final top-1, the token id, the mask and the target ids."""
    per_row_token = top_k * (8 + 4) + 4 + 2 * 4 + (4 + 8) + (1 + n_targets) * (4 + 8)
    per_token = 8 + 8 + 8 + (1 + n_targets) * 8
    return rows * tokens * per_row_token + tokens * per_token


def seed_bytes(rows: int, tokens: int, vocab: int, bytes_per_prob: int = 4) -> int:
    return rows * tokens * vocab * bytes_per_prob


def measure_smollm2(tokens: int = 256) -> tuple[int, int, int]:
    import nnsight

    import lens_plugins as lp
    from lens_plugins.backends.nnsight import logit_lens

    model = lp.load_default_model(backend="nnsight")
    ids = torch.randint(100, 40000, (1, tokens), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with model.trace(ids):
        lens = logit_lens(model, top_k=TOP_K, targets=[" Paris"])
    print(f"SmolLM2 lens trace at {tokens} tokens: {time.perf_counter() - start:.1f} s")
    with model.trace(ids):  # the seed pattern, one layer of it
        hidden = model.model.layers[10].inputs[0][0]
        probs = nnsight.save(torch.softmax(model.lm_head(model.model.norm(hidden)), -1))
    rows = len(lens["labels"])
    return saved_bytes(lens), saved_bytes(probs) * rows, rows


def main() -> None:
    ours, seed, rows = measure_smollm2()
    predicted = lens_bytes(rows, 256)
    print(f"SmolLM2-135M, 256 tokens, {rows} rows, top_k={TOP_K}:")
    print(f"  lens (measured torch.save)      {ours:>15,} B   (formula: {predicted:,} B + pickle framing)")
    print(f"  seed softmax per layer (float32) {seed:>15,} B")
    print(f"  ratio                            {seed / ours:>15,.0f}x")
    rows70, tokens70, vocab70 = 81, 1024, 128256
    ours70 = lens_bytes(rows70, tokens70)
    for name, width in (("float32", 4), ("bfloat16", 2)):
        seed70 = seed_bytes(rows70, tokens70, vocab70, width)
        print(f"Llama-3.1-70B shapes ({rows70} rows, vocab {vocab70}), {tokens70} tokens, seed in {name}:")
        print(f"  lens {ours70:,} B vs seed {seed70:,} B: {seed70 / ours70:,.0f}x smaller")
    assert seed_bytes(rows70, tokens70, vocab70, 2) / ours70 >= 1000, "target: >= 1000x at top_k=10"


if __name__ == "__main__":
    main()
