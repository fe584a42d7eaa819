"""How often the tracked tokens (``auto_tokens=N``) hold a token that was top-1 at an intermediate row but not at
the last, against the final row's top N (the default a lens view shows), on SmolLM2 over a prompt set: the first
``TOKENS`` tokens of ``PROMPTS`` documents of the built-in offline corpus. Also the cost of the choice (the second,
vocabulary-free pass) against the lens alone.

    PYTHONPATH=. python benchmarks/bench_auto_tokens.py        # a few minutes on 2 shared CPU cores
"""

import time

import torch

import lens_plugins as lp
from lens_plugins.backends import transformer_lens as tl
from lens_plugins.training.loop import builtin_corpus

PROMPTS, TOKENS, N = 16, 24, 5


def main():
    model = lp.load_default_model(backend="transformer_lens")
    tokenizer = model.tokenizer
    texts = [t for t in builtin_corpus() if len(tokenizer.encode(t)) >= TOKENS][:PROMPTS]
    ids = torch.tensor([tokenizer.encode(t)[:TOKENS] for t in texts])
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=tl.hook_filter(model))
    tl.logit_lens(cache, tokens=ids, top_k=N)  # warm-up
    start = time.perf_counter()
    plain = tl.logit_lens(cache, tokens=ids, top_k=N)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    result = tl.logit_lens(cache, tokens=ids, top_k=N, auto_tokens=N)
    auto_s = time.perf_counter() - start
    assert torch.equal(plain.top_ids, result.top_ids)
    positions = with_vanished = auto_hits = final_hits = gone = auto_gone = 0
    for b in range(ids.shape[0]):
        for p in range(ids.shape[1]):
            positions += 1
            top1 = result.top_ids[:, b, p, 0]
            vanished = set(top1[1:-1].tolist()) - {int(top1[-1])}
            if not vanished:
                continue
            with_vanished += 1
            auto, final = set(result.auto_ids[b, p].tolist()), set(result.top_ids[-1, b, p].tolist())
            auto_hits += bool(vanished & auto)
            final_hits += bool(vanished & final)
            outside = vanished - final  # top-1 somewhere in the middle, not even in the final top N
            gone += bool(outside)
            auto_gone += bool(outside & auto)
    print(f"SmolLM2-135M-Instruct, {ids.shape[0]} prompts x {ids.shape[1]} tokens = {positions} positions, N = {N}")
    print(f"positions with a token top-1 at an intermediate row but not at the last: {with_vanished}")
    print(f"  tracked set (auto_tokens={N}) holds one: {auto_hits} ({auto_hits / with_vanished:.0%})")
    print(f"  final top-{N} holds one:                 {final_hits} ({final_hits / with_vanished:.0%})")
    print(f"positions where such a token is not in the final top-{N} at all: {gone}; tracked set holds one: {auto_gone}")
    print(f"lens alone {plain_s:.2f} s, with auto_tokens={N} {auto_s:.2f} s (+{auto_s - plain_s:.2f} s)")


if __name__ == "__main__":
    main()
