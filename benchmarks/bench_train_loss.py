"""Tokens per second and peak memory of one tuned-lens training step: the tiled loss of
``lens_plugins.core.vocab_loss`` against the straightforward step (materialise the logits, log_softmax, KL to
the final layer's log-probs, backward), at 2,048 and 16,384 tokens per step.

A step is what training does per row: translate ``[tokens, d_model]`` residuals, apply the final norm, take
KL(final || lens) over SmolLM2-135M's 49,152-token vocabulary with its real final norm and unembedding,
back-propagate into the translator, take an SGD step. Each (approach, tokens) runs in a fresh process, so its
peak memory is its own: the rise of ``VmHWM`` over the process's state after setup (weights, residuals and
the reference summary or log-probs, which both approaches need and keep). ``materialised`` and ``tiled`` run
in float32 with the same thread count; ``tiled-bf16`` runs the tiled loss's vocabulary matmuls in bfloat16
(``matmul_dtype``), everything else in float32.

    python benchmarks/bench_train_loss.py                 # 2,048 and 16,384 tokens
    python benchmarks/bench_train_loss.py --tokens 2048   # only the smaller size
    python benchmarks/bench_train_loss.py --tokens 16384 --approaches tiled tiled-bf16

The materialised step at 16,384 tokens holds several [16384, 49152] float32 tensors (3.2 GB each): run that
size on a machine with ~20 GB free.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch


APPROACHES = ("materialised", "tiled", "tiled-bf16")


def peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM, the peak resident set size
        f.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def setup(tokens: int):
    from dataclasses import replace

    from lens_plugins.backends.hf import decoder_tensors
    from lens_plugins.models import default_model_dir, load_hf_model

    hf, _ = load_hf_model(default_model_dir())
    decoder = decoder_tensors(hf)
    decoder = replace(decoder, W_U=decoder.W_U.contiguous())  # lm_head.weight.T is a strided view
    del hf
    generator = torch.Generator().manual_seed(0)
    d_model = decoder.d_model
    resid = torch.randn(tokens, d_model, generator=generator) * 4
    final = torch.randn(tokens, d_model, generator=generator) * 4
    return decoder, resid, final


def run_one(approach: str, tokens: int, steps: int) -> dict:
    from lens_plugins.core import vocab_loss
    from lens_plugins.core.readout import DecoderTensors

    decoder, resid, final = setup(tokens)
    W_U = decoder.W_U
    d_model = W_U.shape[0]
    translator = torch.nn.Linear(d_model, d_model)
    torch.nn.init.zeros_(translator.weight)
    torch.nn.init.zeros_(translator.bias)
    optimizer = torch.optim.SGD(translator.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    with torch.no_grad():
        final_normed = decoder.normalize(final)
        if approach.startswith("tiled"):
            dtype = torch.bfloat16 if approach == "tiled-bf16" else torch.float32
            W_U = W_U.to(dtype)  # cast once, as training does
            unembedding = DecoderTensors("none", W_U)
            reference = vocab_loss.reference_summary(final_normed, unembedding, matmul_dtype=dtype)
        else:
            reference = (final_normed @ W_U).log_softmax(-1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        normed = decoder.normalize(resid + translator(resid))
        if approach.startswith("tiled"):
            loss = vocab_loss.kl_divergence(normed, reference, unembedding).mean()
        else:
            log_q = (normed @ W_U).log_softmax(-1)
            loss = (reference.exp() * (reference - log_q)).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(translator.parameters(), 1.0)
        optimizer.step()
        return float(loss)

    step()  # warm-up: allocator, kernels
    peak_rss_reset()
    base = peak_rss_mb()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    seconds = (time.perf_counter() - start) / steps
    return {"approach": approach, "tokens": tokens, "seconds_per_step": seconds, "tokens_per_second": tokens / seconds,
            "extra_peak_mb": peak_rss_mb() - base, "loss": losses[-1], "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--approaches", nargs="+", default=list(APPROACHES), choices=APPROACHES)
    parser.add_argument("--one", nargs=2, metavar=("APPROACH", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.steps)))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("| tokens/step | approach | s/step | tokens/s | extra peak MB | tiled speed-up | tiled memory share |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for tokens in args.tokens:
        results = {}
        for approach in args.approaches:
            out = subprocess.run([sys.executable, __file__, "--one", approach, str(tokens), "--steps", str(args.steps)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"| {tokens} | {approach} | failed: {out.stderr.strip().splitlines()[-1]} | | | | |")
                continue
            results[approach] = json.loads(out.stdout.strip().splitlines()[-1])
        for approach, r in results.items():
            ratio = share = ""
            if approach.startswith("tiled") and "materialised" in results:
                m = results["materialised"]
                ratio = f"{r['tokens_per_second'] / m['tokens_per_second']:.2f}x"
                share = f"{r['extra_peak_mb'] / max(m['extra_peak_mb'], 1e-9):.3f}"
            print(f"| {tokens} | {approach} | {r['seconds_per_step']:.2f} | {r['tokens_per_second']:.0f} | "
                  f"{r['extra_peak_mb']:.0f} | {ratio} | {share} |", flush=True)


if __name__ == "__main__":
    main()
