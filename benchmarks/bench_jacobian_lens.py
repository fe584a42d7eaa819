"""Fitting a Jacobian lens: this package against TransformerLens 4.3's ``JacobianLens.fit``, same prompts, same
token ids, same machine, one run.

Approaches (each measured in a fresh process, alternating, medians over ``--rounds``):
- ``transformer_lens``: ``transformer_lens.tools.analysis.JacobianLens.fit(bridge, prompts, dim_batch=8)``,
  the reference (its default ``dim_batch``; it replicates the forward pass ``dim_batch`` times and runs
  ``ceil(d_model / dim_batch)`` backward passes per prompt);
- ``lens_plugins_tl``: ``lp.JacobianLens.fit(bridge, prompts)`` on the same TransformerBridge;
- ``lens_plugins_nnsight``: ``lp.JacobianLens.fit(nnsight_model, prompts)`` on the Hugging Face model.
Time is the fit alone (the model is loaded and run once first, which pages its weights in); peak memory is the
process's peak resident set during the fit above its resident set before it (``/proc/self/clear_refs`` resets
the peak). Each run saves its matrices
and the parent prints the largest difference from the reference's, so a fast wrong fit cannot pass.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_jacobian_lens.py --prompts 2 --tokens 32 --rounds 2
--source-layers 24 25 26 27 28`` (the top five blocks: every backward pass runs through the blocks above the
earliest source, so the full fit of all 29 costs ~6x more, the same for both tools).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

APPROACHES = ("transformer_lens", "lens_plugins_tl", "lens_plugins_nnsight")


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def prompts_for(tokenizer, n: int, tokens: int) -> list[str]:
    """``n`` texts of the built-in corpus whose BOS + ids are exactly ``tokens`` long and re-tokenize to the same
    ids (so TransformerLens's ``to_tokens`` and this package's ``prepend_bos=True`` run identical inputs)."""
    from lens_plugins.training.loop import builtin_corpus

    chosen = []
    for text in builtin_corpus():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens - 1]
        if len(ids) < tokens - 1:
            continue
        cut = tokenizer.decode(ids)
        if tokenizer(cut, add_special_tokens=False)["input_ids"] == ids:
            chosen.append(cut)
        if len(chosen) == n:
            return chosen
    raise SystemExit(f"not {n} prompts of {tokens} tokens in the corpus")


def one(approach: str, n: int, tokens: int, skip: int, chunk: int, out: str, layers) -> dict:
    warnings.filterwarnings("ignore")
    import torch

    import lens_plugins as lp
    from lens_plugins.models import default_model_dir, load_hf_model

    model, tokenizer = load_hf_model(default_model_dir())
    prompts = prompts_for(tokenizer, n, tokens)
    if approach == "lens_plugins_nnsight":
        target = lp.nnsight.wrap_model(model, tokenizer)
    else:
        from transformer_lens.model_bridge import TransformerBridge

        target = TransformerBridge.boot_transformers("SmolLM2-135M-Instruct", hf_model=model,
                                                     tokenizer=tokenizer).eval()
    with torch.no_grad():  # page the weights in first (a memory-mapped checkpoint), so the peak is the fit's own
        model(**tokenizer(prompts[0], return_tensors="pt"))
    Path("/proc/self/clear_refs").write_text("5")
    before = rss_kb("VmRSS")
    started = time.perf_counter()
    if approach == "transformer_lens":
        from transformer_lens.tools.analysis.jacobian_lens import JacobianLens

        lens = JacobianLens.fit(target, prompts, corpus="builtin", skip_first_positions=skip, show_progress=False,
                                source_layers=layers)
        matrices = lens.jacobians
    else:
        lens = lp.JacobianLens.fit(target, prompts, skip_first=skip, chunk=chunk, prepend_bos=True, progress=False,
                                   max_seq_len=tokens, source_layers=layers)
        matrices = lens.jacobians
    seconds = time.perf_counter() - started
    peak = rss_kb("VmHWM")
    torch.save(matrices, out)
    return {"seconds": seconds, "peak_mb": (peak - before) / 1024, "n_prompts": lens.n_prompts,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--skip", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--source-layers", type=int, nargs="+", default=None,
                        help="blocks to fit (default all but the last); the top few keep a CPU run short")
    parser.add_argument("--approaches", nargs="+", default=list(APPROACHES), choices=APPROACHES)
    parser.add_argument("--one", choices=APPROACHES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.prompts, args.tokens, args.skip, args.chunk, args.out, args.source_layers)))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from cpu import cpu_description

    import torch

    print(f"# Jacobian-lens fit, SmolLM2-135M-Instruct, {args.prompts} prompt(s) x {args.tokens} tokens, "
          f"skip_first={args.skip}, chunk={args.chunk}, source layers {args.source_layers or 'all'}; "
          f"{cpu_description()}", flush=True)
    results = {a: [] for a in args.approaches}
    diffs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for approach in args.approaches:
                out = os.path.join(tmp, f"{approach}.pt")
                command = [sys.executable, __file__, "--one", approach, "--out", out, "--prompts", str(args.prompts),
                           "--tokens", str(args.tokens), "--skip", str(args.skip), "--chunk", str(args.chunk)]
                if args.source_layers:
                    command += ["--source-layers", *map(str, args.source_layers)]
                load = os.getloadavg()[0]
                line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                record = json.loads(line) | {"load": load}
                results[approach].append(record)
                print(f"round {round_ + 1} {approach}: {record}", flush=True)
            if "transformer_lens" in args.approaches:
                reference = torch.load(os.path.join(tmp, "transformer_lens.pt"))
                scale = max(float(m.abs().max()) for m in reference.values())
                for approach in args.approaches:
                    mine = torch.load(os.path.join(tmp, f"{approach}.pt"))
                    diffs[approach] = max(float((mine[k] - reference[k]).abs().max()) for k in reference) / scale
    base = statistics.median(r["seconds"] for r in results.get("transformer_lens", [])) \
        if "transformer_lens" in results else None
    print("\n| approach | fit (s, median) | x TransformerLens | peak memory above the model (MB) | max abs diff / max abs J |")
    print("|---|---|---|---|---|")
    for approach, records in results.items():
        seconds = statistics.median(r["seconds"] for r in records)
        peak = statistics.median(r["peak_mb"] for r in records)
        ratio = f"{base / seconds:.2f}x faster" if base else "-"
        diff = f"{diffs[approach]:.1e}" if approach in diffs else "-"
        print(f"| {approach} | {seconds:.1f} | {ratio} | {peak:.0f} | {diff} |")
    print(f"\nload average during the runs: {[round(r['load'], 1) for rs in results.values() for r in rs]}; "
          f"threads: {results[args.approaches[0]][0]['threads']}")


if __name__ == "__main__":
    main()
