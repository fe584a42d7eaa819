"""Full logit lens on SmolLM2-135M: ours against the floor, TransformerLens's tool and the naive way.

One 256-token prompt, all 31 rows x 256 positions, with top-5, entropy, KL both ways and the ranks of
the final top-1 and of the next token: ours through a TransformerLens cache (fused tile step, and eager),
ours inside an nnsight trace (eager: the in-trace readout is the one that ships to servers), TransformerLens
4.x's ``tools.analysis.logit_lens`` (full-vocabulary log-probs, then the same reductions) and the naive
stack-then-log_softmax way. Each approach runs in its own subprocess (so peak memory is its
own), after the model is loaded and its peak-RSS counter reset; time is the best of ``--repeats`` runs.
Reported as ratios to the floor: forward pass + one bare ``W_U`` matmul per layer, nothing kept.

    python benchmarks/bench_logit_lens.py [--tokens 256] [--repeats 3]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from unittest.mock import patch

APPROACHES = ("floor", "lens_plugins", "lens_plugins_eager", "lens_plugins_nnsight", "transformer_lens_tool", "naive")
TEXT = (
    "The logit lens decodes each layer's residual stream through the model's final norm and unembedding. "
    "Paris is the capital of France, Berlin the capital of Germany, and Madrid the capital of Spain. "
    "In 1905 Albert Einstein published four papers that changed physics: on the photoelectric effect, "
    "Brownian motion, special relativity and the equivalence of mass and energy. "
)


def peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM, the peak resident set size
        f.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def stats_from_log_probs(logp, next_ids):
    """The reductions every approach must deliver, from materialised [row, pos, vocab] log-probs."""
    import torch

    final = logp[-1]
    p = logp.exp()
    top = logp.topk(5, dim=-1)
    entropy = -(p * logp).sum(-1)
    kl_final_row = (final.exp() * (final - logp)).sum(-1)
    kl_row_final = (p * (logp - final)).sum(-1)
    top1 = final.argmax(-1)
    own = logp.gather(-1, top1.expand(logp.shape[0], -1).unsqueeze(-1))
    rank_top1 = (logp > own).sum(-1)
    own_next = logp[:, :-1].gather(-1, next_ids.expand(logp.shape[0], -1).unsqueeze(-1))
    rank_next = (logp[:, :-1] > own_next).sum(-1)
    return top, entropy, kl_final_row, kl_row_final, rank_top1, rank_next, torch


def run(approach: str, n_tokens: int, repeats: int) -> dict:
    import torch

    import lens_plugins as lp

    torch.set_grad_enabled(False)
    model = lp.load_default_model(backend="transformer_lens")
    tokens = model.to_tokens(TEXT * 10)[:, :n_tokens]
    assert tokens.shape[1] == n_tokens
    n_layers = model.cfg.n_layers
    hooks = lp.transformer_lens.hook_filter(model)

    def floor():
        _, cache = model.run_with_cache(tokens, names_filter=hooks)
        for layer in range(n_layers):
            cache[f"blocks.{layer}.hook_resid_pre"][0] @ model.W_U

    def ours():
        _, cache = model.run_with_cache(tokens, names_filter=hooks)
        lp.transformer_lens.logit_lens(cache, tokens=tokens, top_k=5)

    def ours_eager():
        with patch.dict(os.environ, {"LENS_PLUGINS_FUSED": "0"}):
            ours()

    def ours_nnsight():
        with nn_model.trace(tokens):
            lens = lp.nnsight.logit_lens(nn_model, top_k=5)
        lp.nnsight.result(lens, nn_model)

    def tl_tool():
        from transformer_lens.tools.analysis import logit_lens

        _, cache = model.run_with_cache(tokens, names_filter=hooks)
        result = logit_lens(cache, positions=None, return_type="log_probs")
        stats_from_log_probs(result.values[:, 0], tokens[0, 1:])

    def naive():
        _, cache = model.run_with_cache(tokens, names_filter=hooks)
        stack, _ = lp.transformer_lens.residual_stack(cache)
        decoder = lp.transformer_lens.decoder_for(model)
        logp = decoder.logits(stack[:, 0]).log_softmax(-1)
        stats_from_log_probs(logp, tokens[0, 1:])

    nn_model = lp.load_default_model(backend="nnsight") if approach == "lens_plugins_nnsight" else None
    fn = {"floor": floor, "lens_plugins": ours, "lens_plugins_eager": ours_eager, "lens_plugins_nnsight": ours_nnsight,
          "transformer_lens_tool": tl_tool, "naive": naive}[approach]
    fn()  # warm-up: allocator, lazy imports
    peak_rss_reset()
    base = peak_rss_mb()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"approach": approach, "seconds": min(times), "peak_extra_mb": peak_rss_mb() - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=APPROACHES)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run(args.only, args.tokens, args.repeats)))
        return
    results = []
    for approach in APPROACHES:
        out = subprocess.run(
            [sys.executable, __file__, "--only", approach, "--tokens", str(args.tokens), "--repeats", str(args.repeats)],
            check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    floor = results[0]
    print(f"SmolLM2-135M, {args.tokens} tokens, 31 rows, top-5 + entropy + KL both ways + 2 ranks; "
          f"torch threads={os.cpu_count()}")
    print(f"{'approach':<24}{'time (s)':>10}{'x floor':>10}{'peak extra (MB)':>18}{'- floor (MB)':>15}")
    for r in results:
        print(f"{r['approach']:<24}{r['seconds']:>10.2f}{r['seconds'] / floor['seconds']:>10.2f}"
              f"{r['peak_extra_mb']:>18.0f}{r['peak_extra_mb'] - floor['peak_extra_mb']:>15.0f}")


if __name__ == "__main__":
    main()
