"""The readout on a GPU at Llama-3.1-8B shapes (random bfloat16 weights): ``readout.lens_statistics`` in each
precision against the bare unembeddings, the forward pass and the naive readout.

Shapes: 33 rows (embeddings, 31 layer inputs, the last layer's output), 1,024 tokens, d_model 4,096, vocabulary
128,256. The floor is the forward pass plus one bare unembedding matmul per row: in bfloat16 (the model's
dtype), in float32 and in float32 with TF32 allowed. Each precision of the lens is timed on its first call in
this process (after CUDA is initialised) and in steady state (median of ``--repeats``), with its peak GPU
memory above what was allocated before, its largest entropy difference from the float32 lens and the share
of top-1 ids it keeps; the float32 lens's entropy is also checked against the naive readout's, an independent
path, so that a fast wrong answer cannot pass for a result.

Only torch (and transformers for the forward pass) is needed: the readout is ``lens_plugins.core``, which
imports nothing else, so the script runs on a bare GPU machine from a checkout. ``--device cpu`` with small
``--rows / --d-model / --vocab`` runs the same code on a CPU (TF32 skipped, no memory figures): the test suite
does that, so the script cannot rot while no GPU is at hand.

    python benchmarks/bench_gpu_readout.py [--tokens 1024] [--repeats 5] [--no-forward] [--markdown]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lens_plugins.core import readout  # noqa: E402

ROWS, D_MODEL, VOCAB = 33, 4096, 128256


def timed(fn, repeats, device):
    """``(first, median steady, result, peak extra bytes or None)`` of ``fn()``, synchronised around each call on
    a GPU (peak memory is measured there only)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    sync()
    first = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), result, peak


def residual_stack(args, device):
    """``(stack [rows, tokens, d_model] bf16, forward seconds or None, final norm weight, W_U [d_model, vocab]
    bf16)`` from a randomly initialised Llama-3.1-8B-shaped model, or random tensors with ``--no-forward``."""
    if args.no_forward:
        g = torch.Generator(device=device).manual_seed(0)
        stack = torch.randn(args.rows, args.tokens, args.d_model, device=device, generator=g, dtype=torch.bfloat16)
        W_U = (torch.randn(args.d_model, args.vocab, device=device, generator=g) * args.d_model**-0.5).bfloat16()
        return stack, None, torch.ones(args.d_model, device=device), W_U
    import transformers

    heads = max(1, args.d_model // 128)  # Llama-3.1-8B: 32 heads of 128, 8 key-value heads, MLP 3.5 x d_model
    config = transformers.LlamaConfig(
        hidden_size=args.d_model, intermediate_size=args.d_model * 7 // 2, num_hidden_layers=args.rows - 1,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=args.vocab,
        max_position_embeddings=8192, rope_theta=500000.0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, args.vocab, (1, args.tokens), device=device)
    _, seconds, out, _ = timed(lambda: model(ids, output_hidden_states=True), args.repeats, device)
    stack = torch.stack([h[0] for h in out.hidden_states])  # embeddings, every layer's output (incl. final)
    norm_weight = model.model.norm.weight.detach().float()
    W_U = model.lm_head.weight.detach().T  # [d_model, vocab] bf16 view
    del model, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return stack, seconds, norm_weight, W_U


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-forward", action="store_true", help="random residuals instead of a random model's")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run at small shapes)")
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--d-model", type=int, default=D_MODEL)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu_readout.py measures a CUDA device and none is available (--device cpu for a smoke run)")
    torch.set_grad_enabled(False)
    stack, forward_s, norm_weight, W_U = residual_stack(args, device)
    W_U32 = W_U.float()
    rows = args.rows

    def floor(s, W):  # one matmul per layer, as the CPU floor
        for r in range(1, rows):
            s[r] @ W

    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    _, bf16_s, _, _ = timed(lambda: floor(stack, W_U), args.repeats, device)
    stack32 = stack.float()
    _, fp32_s, _, _ = timed(lambda: floor(stack32, W_U32), args.repeats, device)
    tf32_s = None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        _, tf32_s, _, _ = timed(lambda: floor(stack32, W_U32), args.repeats, device)
        torch.backends.cuda.matmul.allow_tf32 = False
    fwd = forward_s or 0.0
    floors = {"float32": fwd + fp32_s, "tf32": fwd + (tf32_s or 0.0), "bf16x3": fwd + bf16_s}

    targets = torch.randint(0, args.vocab, (args.tokens, 1), device=device)
    targets[-1] = readout.NO_TARGET

    def lens(precision, W):
        return readout.lens_statistics(stack, readout.DecoderTensors("rmsnorm", W, norm_weight), 5, targets,
                                       precision=precision)

    results, measured = {}, []
    for precision in readout.PRECISIONS if cuda else ("float32", "bf16x3"):  # TF32 is a CUDA format
        W = W_U if precision == "bf16x3" else W_U32  # bf16x3 reads the model's own bf16 W_U: no low part
        first, steady, out, peak = timed(lambda: lens(precision, W), args.repeats, device)
        results[precision] = out
        measured.append((precision, first, steady, peak))

    def naive():  # float32 logits of 4 rows at a time, log_softmax, the same reductions; returns the entropy
        final = torch.log_softmax((readout.apply_final_norm(stack[-1], "rmsnorm", norm_weight, None, 1e-5)
                                   @ W_U32), -1)
        entropy = []
        for r0 in range(0, rows, 4):
            logp = torch.log_softmax(readout.apply_final_norm(stack[r0:r0 + 4], "rmsnorm", norm_weight, None, 1e-5)
                                     @ W_U32, -1)
            p = logp.exp()
            logp.topk(5, -1), (p * (logp - final)).sum(-1), (final.exp() * (final - logp)).sum(-1)
            entropy.append(-(p * logp).sum(-1))
        return torch.cat(entropy)

    naive_first, naive_steady, naive_entropy, naive_peak = timed(naive, args.repeats, device)

    exact = results["float32"]
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    tf32_text = f", TF32 {tf32_s * 1e3:.0f} ms" if tf32_s is not None else ""
    print(f"{name}, torch {torch.__version__}; {rows} rows x {args.tokens} tokens, d_model {args.d_model}, "
          f"vocab {args.vocab}; forward {fwd * 1e3:.0f} ms; bare unembeddings bf16 {bf16_s * 1e3:.0f} ms, "
          f"float32 {fp32_s * 1e3:.0f} ms{tf32_text}")
    print(f"float32 lens vs naive readout: max entropy difference "
          f"{float((exact['entropy'] - naive_entropy).abs().max()):.1e}")

    def memory(peak):
        return "-" if peak is None else f"{peak / 2**30:.2f} GiB"

    sep = " | " if args.markdown else "  "
    if args.markdown:
        print("| precision | first call | steady | x its floor | peak GPU memory | max entropy diff vs float32 | top-1 kept |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
    for precision, first, steady, peak in measured:
        out = results[precision]
        diff = float((out["entropy"] - exact["entropy"]).abs().max())
        kept = float((out["top_ids"][..., 0] == exact["top_ids"][..., 0]).float().mean())
        cells = [precision, f"{first * 1e3:.0f} ms", f"{steady * 1e3:.0f} ms", f"{steady / floors[precision]:.2f}x",
                 memory(peak), f"{diff:.1e}", f"{kept:.2%}"]
        print(("| " if args.markdown else "") + sep.join(cells) + (" |" if args.markdown else ""))
    cells = ["naive (float32, 4 rows at a time)", f"{naive_first * 1e3:.0f} ms", f"{naive_steady * 1e3:.0f} ms",
             f"{naive_steady / floors['float32']:.2f}x", memory(naive_peak), "-", "-"]
    print(("| " if args.markdown else "") + sep.join(cells) + (" |" if args.markdown else ""))
    print("floors: float32 lens vs forward + float32 unembeddings; tf32 vs forward + TF32; bf16x3 vs forward + bf16")


if __name__ == "__main__":
    main()
