"""Full logit lens on SmolLM2-135M: ours against the floor, TransformerLens's tool and the naive way.

One prompt (256 and 4096 tokens by default), all 31 rows x every position, with top-5, entropy, KL both
ways and the ranks of the final top-1 and of the next token, by:

- ``floor``: the forward pass (``run_with_cache``) + one bare ``W_U`` matmul per layer, nothing kept
- ``lens_plugins``: ``run_with_cache`` + ``lp.transformer_lens.logit_lens`` (the TransformerLens cache path)
- ``lens_plugins_nnsight``: the lens inside a local nnsight trace (the readout a server runs)
- ``transformer_lens_tool``: TransformerLens 4.x ``tools.analysis.logit_lens`` (full-vocabulary log-probs),
  then the same reductions
- ``naive``: stack, ``log_softmax``, reduce

Every measurement is a fresh process (model loaded, untimed), timing the **first call** in that process and
then a **steady-state** call; peak memory is the rise of ``VmHWM`` over the first call. Approaches alternate
within each round (the order rotates between rounds) and the figures are medians over ``--rounds``. The
materialising approaches are skipped where their ``[rows, tokens, vocab]`` float32 log-probs would not fit
in ``--max-materialised-gb``.

    python benchmarks/bench_logit_lens.py [--tokens 256 4096] [--rounds 3] [--markdown]
    python benchmarks/bench_logit_lens.py --from-log stderr.log --markdown   # the table of a stopped run
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

APPROACHES = ("floor", "lens_plugins", "lens_plugins_nnsight", "transformer_lens_tool", "naive")
MATERIALISING = ("transformer_lens_tool", "naive")
LABELS = {
    "floor": "floor: forward pass + one bare `W_U` matmul per layer",
    "lens_plugins": "lens_plugins, TransformerLens cache (`run_with_cache` + `logit_lens`)",
    "lens_plugins_nnsight": "lens_plugins inside a local nnsight trace (the server-side readout)",
    "transformer_lens_tool": "TransformerLens 4.x `tools.analysis.logit_lens` + the same reductions",
    "naive": "naive: stack, `log_softmax`, reduce",
}
ROWS, VOCAB = 31, 49152
TEXT = (
    "The logit lens decodes each layer's residual stream through the model's final norm and unembedding. "
    "Paris is the capital of France, Berlin the capital of Germany, and Madrid the capital of Spain. "
    "In 1905 Albert Einstein published four papers that changed physics: on the photoelectric effect, "
    "Brownian motion, special relativity and the equivalence of mass and energy. "
)


def cpu_model() -> str:
    """The CPU's model name and the vector / matrix extensions the kernels can use, from ``lscpu``."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (no lscpu)"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return (f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores, "
            f"flags: {' '.join(f for f in wanted if f in flags) or 'none of ' + '/'.join(wanted)}")


def peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM, the peak resident set size
        f.write("5")


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def stats_from_log_probs(logp, next_ids):
    """The reductions every approach must deliver, from materialised [row, pos, vocab] log-probs."""
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
    return top, entropy, kl_final_row, kl_row_final, rank_top1, rank_next


def run(approach: str, n_tokens: int, steady: bool) -> dict:
    """One fresh-process measurement: the first call, then (optionally) a steady-state call."""
    import torch

    import lens_plugins as lp

    torch.set_grad_enabled(False)
    model = lp.load_default_model(backend="transformer_lens")
    tokens = model.to_tokens(TEXT * (1 + n_tokens // 60), truncate=False)[:, :n_tokens]
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

    def ours_nnsight():
        with nn_model.trace(tokens):
            lens = lp.nnsight.logit_lens(nn_model, top_k=5)
        lp.nnsight.logit_lens_result(lens, nn_model)

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
    fn = {"floor": floor, "lens_plugins": ours, "lens_plugins_nnsight": ours_nnsight,
          "transformer_lens_tool": tl_tool, "naive": naive}[approach]
    peak_rss_reset()
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    peak = rss_mb("VmHWM") - before
    second = None
    if steady:
        start = time.perf_counter()
        fn()
        second = time.perf_counter() - start
    return {"approach": approach, "tokens": n_tokens, "first": first, "steady": second, "peak_mb": peak,
            "threads": torch.get_num_threads(), "load": round(os.getloadavg()[0], 2)}


def measure(approaches, n_tokens, rounds, steady):
    """``{approach: [result per round]}``, each in a fresh process, the order rotating between rounds."""
    results = {a: [] for a in approaches}
    for r in range(rounds):
        order = approaches[r % len(approaches):] + approaches[: r % len(approaches)]
        for approach in order:
            cmd = [sys.executable, __file__, "--only", approach, "--tokens", str(n_tokens)]
            out = subprocess.run(cmd + ([] if steady else ["--no-steady"]), check=True, capture_output=True,
                                 text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            results[approach].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  round {r + 1} {n_tokens} tokens {approach}: {results[approach][-1]}", file=sys.stderr, flush=True)
    return results


def summarise(results):
    """Median first call, steady state and peak per approach, and their ratios to the floor's (with the
    load average each measurement saw)."""
    med = {}
    for approach, runs in results.items():
        steady = [r["steady"] for r in runs if r["steady"] is not None]
        med[approach] = {"first": statistics.median(r["first"] for r in runs),
                         "steady": statistics.median(steady) if steady else None,
                         "peak_mb": statistics.median(r["peak_mb"] for r in runs), "n": len(runs),
                         "loads": [r["load"] for r in runs if "load" in r]}  # a log from before loads were kept has none
    return med


def isa() -> str:
    """The instruction-set caps in force (``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``,
    ``ONEDNN_MAX_CPU_ISA``: how another CPU of the kind is emulated), or "native"."""
    caps = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
            if k in os.environ]
    return ", ".join(caps) or "native instruction set"


def rounds_from_log(path):
    """Medians from the ``round ...: {...}`` lines ``measure`` writes to stderr, so that a run stopped before
    its last round still gives its table."""
    import ast

    results = {}
    with open(path) as f:
        for line in f:
            if line.strip().startswith("round ") and ": {" in line:
                r = ast.literal_eval(line.split(": ", 1)[1].strip())
                results.setdefault(r["tokens"], {}).setdefault(r["approach"], []).append(r)
    return {n: summarise(runs) for n, runs in sorted(results.items())}


def table(by_tokens, markdown, skipped):
    lines = []
    sizes = sorted(by_tokens)
    if markdown:
        head = "| approach | " + " | ".join(f"{n} tokens: first call, steady (x floor) | peak - floor's" for n in sizes)
        lines += [head + " |", "| --- |" + " --- | --- |" * len(sizes)]
    for approach in [a for a in APPROACHES if any(a in med for med in by_tokens.values()) or a in MATERIALISING]:
        cells = []
        for n in sizes:
            med = by_tokens[n]
            if approach not in med and approach not in skipped.get(n, ()):
                cells += ["not run", ""]
                continue
            if approach not in med:
                gb = ROWS * n * VOCAB * 4 / 2**30
                cells += [f"not run (would hold {gb:.0f} GB of log-probs)", ""]
                continue
            floor, m = med["floor"], med[approach]
            if approach == "floor":
                steady = f", {m['steady']:.2f} s" if m["steady"] is not None else ""
                cells += [f"{m['first']:.2f} s{steady} (1.00x)", f"{m['peak_mb']:.0f} MB"]
                continue
            steady = f", {m['steady'] / floor['steady']:.2f}x" if m["steady"] and floor["steady"] else ""
            cells += [f"{m['first'] / floor['first']:.2f}x{steady}", f"{m['peak_mb'] - floor['peak_mb']:+.0f} MB"]
        if markdown:
            lines.append(f"| {LABELS[approach]} | " + " | ".join(cells) + " |")
        else:
            lines.append(f"{approach:<24}" + "".join(f"{c:>34}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--approaches", nargs="+", choices=APPROACHES, default=list(APPROACHES))
    parser.add_argument("--max-materialised-gb", type=float, default=3.0,
                        help="skip the approaches that hold [rows, tokens, vocab] log-probs above this size")
    parser.add_argument("--no-steady", action="store_true", help="time only the first call in each process")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument("--from-log", metavar="FILE",
                        help="print the table from the per-round lines of an earlier run's stderr (an interrupted run)")
    parser.add_argument("--only", choices=APPROACHES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run(args.only, args.tokens[0], not args.no_steady)))
        return
    if args.from_log:
        by_tokens = rounds_from_log(args.from_log)
        print(f"SmolLM2-135M, {ROWS} rows, top-5 + entropy + KL both ways + 2 ranks; rounds per size "
              f"{ {n: max(m['n'] for m in med.values()) for n, med in by_tokens.items()} } (from {args.from_log})")
        print(table(by_tokens, args.markdown, {}))
        return
    approaches = ["floor"] + [a for a in args.approaches if a != "floor"]
    by_tokens, skipped = {}, {}
    for n in args.tokens:
        fits = [a for a in approaches
                if a not in MATERIALISING or ROWS * n * VOCAB * 4 / 2**30 <= args.max_materialised_gb]
        skipped[n] = [a for a in approaches if a not in fits]
        by_tokens[n] = summarise(measure(fits, n, args.rounds, not args.no_steady))
    import torch

    loads = [load for med in by_tokens.values() for m in med.values() for load in m["loads"]]
    print(f"SmolLM2-135M, {ROWS} rows, top-5 + entropy + KL both ways + 2 ranks; {cpu_model()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {isa()}; medians of {args.rounds} "
          f"fresh-process rounds (peak: VmHWM rise over the first call); 1-minute load average during the "
          f"measurements {min(loads, default=0):.1f}-{max(loads, default=0):.1f}")
    print(table(by_tokens, args.markdown, skipped))
    print(json.dumps(by_tokens))


if __name__ == "__main__":
    main()
