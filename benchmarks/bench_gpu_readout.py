"""The readout on a GPU at Llama-3.1-8B shapes (random bfloat16 weights): ``readout.lens_statistics`` in each
precision against the bare unembeddings, the forward pass and the naive readout.

Shapes: 33 rows (embeddings, 31 layer inputs, the last layer's output), 1,024 tokens, d_model 4,096, vocabulary
128,256. The floor is the forward pass plus one bare unembedding matmul per row: in bfloat16 (the model's
dtype), in float32 and in float32 with TF32 allowed. Each precision of the lens is timed on its first call in
this process (after CUDA is initialised) and in steady state (median of ``--repeats``), with its peak GPU
memory above what was allocated before, its largest entropy difference from the float32 lens and the share
of top-1 ids it keeps. Needs a CUDA device; nothing here runs on a CPU.

    python benchmarks/bench_gpu_readout.py [--tokens 1024] [--repeats 5] [--no-forward] [--markdown]
"""

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
from lens_plugins import readout  # noqa: E402

ROWS, D_MODEL, VOCAB = 33, 4096, 128256


def timed(fn, repeats):
    """``(first, median steady, result, peak extra bytes)`` of ``fn()`` with CUDA synchronised around each call."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), result, peak


def residual_stack(tokens, forward, repeats):
    """``(stack [rows, tokens, d_model] bf16, forward seconds or None, final norm weight, W_U [d_model, vocab]
    bf16)`` from a randomly initialised Llama-3.1-8B-shaped model, or random tensors with ``forward=False``."""
    if not forward:
        g = torch.Generator(device="cuda").manual_seed(0)
        stack = torch.randn(ROWS, tokens, D_MODEL, device="cuda", generator=g, dtype=torch.bfloat16)
        W_U = (torch.randn(D_MODEL, VOCAB, device="cuda", generator=g) * D_MODEL**-0.5).bfloat16()
        return stack, None, torch.ones(D_MODEL, device="cuda"), W_U
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=D_MODEL, intermediate_size=14336, num_hidden_layers=ROWS - 1, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=VOCAB, max_position_embeddings=8192, rope_theta=500000.0,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, VOCAB, (1, tokens), device="cuda")
    with torch.no_grad():
        _, seconds, out, _ = timed(lambda: model(ids, output_hidden_states=True), repeats)
    stack = torch.stack([h[0] for h in out.hidden_states])  # embeddings, every layer's output (incl. final)
    norm_weight = model.model.norm.weight.detach().float()
    W_U = model.lm_head.weight.detach().T  # [d_model, vocab] bf16 view
    del model, out
    torch.cuda.empty_cache()
    return stack, seconds, norm_weight, W_U


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-forward", action="store_true", help="random residuals instead of a random model's")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_readout.py needs a CUDA device")
    torch.set_grad_enabled(False)
    stack, forward_s, norm_weight, W_U = residual_stack(args.tokens, not args.no_forward, args.repeats)
    W_U32 = W_U.float()
    rows = []

    def floor(W):
        for r in range(1, ROWS):  # one matmul per layer, as the CPU floor
            stack[r] @ W

    torch.backends.cuda.matmul.allow_tf32 = False
    _, bf16_s, _, _ = timed(lambda: floor(W_U), args.repeats)
    stack32 = stack.float()
    _, fp32_s, _, _ = timed(lambda: (lambda s: [s[r] @ W_U32 for r in range(1, ROWS)])(stack32), args.repeats)
    torch.backends.cuda.matmul.allow_tf32 = True
    _, tf32_s, _, _ = timed(lambda: (lambda s: [s[r] @ W_U32 for r in range(1, ROWS)])(stack32), args.repeats)
    torch.backends.cuda.matmul.allow_tf32 = False
    fwd = forward_s or 0.0
    floors = {"float32": fwd + fp32_s, "tf32": fwd + tf32_s, "bf16x3": fwd + bf16_s}

    targets = torch.randint(0, VOCAB, (args.tokens, 1), device="cuda")
    targets[-1] = readout.NO_TARGET

    def lens(precision, W):
        return readout.lens_statistics(stack, "rmsnorm", norm_weight, None, 1e-5, W, None, None, 5, targets,
                                       precision=precision)

    results = {}
    for precision in ("float32", "tf32", "bf16x3"):
        W = W_U if precision == "bf16x3" else W_U32  # bf16x3 reads the model's own bf16 W_U: no low part
        first, steady, out, peak = timed(lambda: lens(precision, W), args.repeats)
        results[precision] = out
        rows.append((precision, first, steady, peak))

    def naive():  # float32 logits of 4 rows at a time, log_softmax, the same reductions
        final = torch.log_softmax((readout.apply_final_norm(stack[-1], "rmsnorm", norm_weight, None, 1e-5)
                                   @ W_U32), -1)
        for r0 in range(0, ROWS, 4):
            logp = torch.log_softmax(readout.apply_final_norm(stack[r0:r0 + 4], "rmsnorm", norm_weight, None, 1e-5)
                                     @ W_U32, -1)
            p = logp.exp()
            logp.topk(5, -1), -(p * logp).sum(-1), (p * (logp - final)).sum(-1), (final.exp() * (final - logp)).sum(-1)

    naive_first, naive_steady, _, naive_peak = timed(naive, args.repeats)

    exact = results["float32"]
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}; {ROWS} rows x {args.tokens} tokens, d_model {D_MODEL}, vocab {VOCAB}; "
          f"forward {fwd * 1e3:.0f} ms; bare unembeddings bf16 {bf16_s * 1e3:.0f} ms, float32 {fp32_s * 1e3:.0f} ms, "
          f"TF32 {tf32_s * 1e3:.0f} ms")
    sep = " | " if args.markdown else "  "
    if args.markdown:
        print("| precision | first call | steady | x its floor | peak GPU memory | max entropy diff vs float32 | top-1 kept |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
    for precision, first, steady, peak in rows:
        out = results[precision]
        diff = float((out["entropy"] - exact["entropy"]).abs().max())
        kept = float((out["top_ids"][..., 0] == exact["top_ids"][..., 0]).float().mean())
        cells = [precision, f"{first * 1e3:.0f} ms", f"{steady * 1e3:.0f} ms", f"{steady / floors[precision]:.2f}x",
                 f"{peak / 2**30:.2f} GiB", f"{diff:.1e}", f"{kept:.2%}"]
        print(("| " if args.markdown else "") + sep.join(cells) + (" |" if args.markdown else ""))
    cells = ["naive (float32, 4 rows at a time)", f"{naive_first * 1e3:.0f} ms", f"{naive_steady * 1e3:.0f} ms",
             f"{naive_steady / floors['float32']:.2f}x", f"{naive_peak / 2**30:.2f} GiB", "-", "-"]
    print(("| " if args.markdown else "") + sep.join(cells) + (" |" if args.markdown else ""))
    print("floors: float32 lens vs forward + float32 unembeddings; tf32 vs forward + TF32; bf16x3 vs forward + bf16")


if __name__ == "__main__":
    main()
