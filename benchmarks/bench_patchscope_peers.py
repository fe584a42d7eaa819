"""Patchscopes beside nnterp's ``patchscope_lens`` and a plain one-pair-per-forward loop: pairs per second,
same model, same token ids, same pairs, one run.

The experiment is nnterp's: the hidden state of each source prompt's last token at block ``l``'s output is
written into the target prompt ``"king king\\n1135 1135\\nhello hello\\n?"`` at its last position, at the same
block's output, and the patched target's next-token distribution is read there; one pair per (source, block),
every block of SmolLM2-135M (30), ``--sources`` prompts of the built-in corpus cut to the same token length (so
that nnterp's batched source trace needs no padding, which would shift its positions).

Approaches, each in a fresh process (model loaded and run once untimed first), alternating, medians over
``--rounds``:
- ``nnterp``: ``nnterp.interventions.patchscope_lens(StandardizedTransformer(model), sources, repeat_prompt(),
  layers=range(30))`` (nnterp 1.3.0 with nnsight 0.6.3, the last nnsight it imports (0.8 removed
  ``nnsight.intervention.tracing``), and transformers 5.24: a throwaway venv under the temp dir, built by this
  script; it returns every pair's full ``[vocab]`` probabilities);
- ``lens_plugins_nnsight``: ``lp.nnsight.run_patchscope(model, ids, layers=<block outputs>,
  positions=[-1], target_prompt=<ids>)`` per source (one source trace and one target trace per batch of 64
  pairs; the default reductions: top-5, entropy, ranks);
- ``loop``: plain PyTorch, one forward of the target per pair with a forward hook on block ``l`` writing the
  hidden state (what one writes without a library).
Peak memory is the rise of the process's peak resident set over the timed call. Every approach saves each pair's top-1 id and probability; the parent prints the largest difference from the
loop's, so a fast wrong run cannot pass.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_patchscope_peers.py --sources 8 --rounds 3``
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APPROACHES = ("nnterp", "lens_plugins_nnsight", "loop")
TARGET = "king king\n1135 1135\nhello hello\n?"
VENV = Path(tempfile.gettempdir()) / "lens-plugins-nnterp"
TORCH_WHEEL_DIRS = ("/opt/wheels",)


def venv_python() -> Path:
    """nnterp 1.3.0 in a throwaway venv (never the project's): CPU torch 2.13 from the local wheel, nnsight
    0.6.3 (nnterp 1.3.0 imports a module nnsight 0.8 removed) and the transformers this package is tested with."""
    python = VENV / "bin" / "python"
    if (VENV / ".installed").exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    wheels = [p for d in TORCH_WHEEL_DIRS for p in Path(d).glob("torch-2.13.0*.whl")]
    torch_spec = str(wheels[0]) if wheels else "torch==2.13.0"
    constraints = VENV / "constraints.txt"
    constraints.write_text("torch==2.13.0\nnnsight==0.6.3\ntransformers==5.24.0\n")
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [torch_spec], check=True)
    subprocess.run(pip + ["-c", str(constraints), "nnterp==1.3.0"], check=True)
    (VENV / ".installed").touch()
    return python


def model_copy() -> Path:
    """SmolLM2-135M-Instruct saved as a plain Hugging Face directory (the embedded model converted once), for the
    venv that cannot import lens_plugins."""
    target = Path(tempfile.gettempdir()) / "lens-plugins-smollm2-hf"
    if not (target / "config.json").exists():
        from lens_plugins.models import default_model_dir, load_hf_model

        model, tokenizer = load_hf_model(default_model_dir())
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return target


def sources_for(tokenizer, n: int, tokens: int) -> list[str]:
    """``n`` texts of the built-in corpus that tokenize to exactly ``tokens`` ids and back to the same ids."""
    from lens_plugins.training.loop import builtin_corpus

    chosen = []
    for text in builtin_corpus():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        if len(ids) < tokens:
            continue
        cut = tokenizer.decode(ids)
        if tokenizer(cut)["input_ids"] == tokenizer(cut, add_special_tokens=False)["input_ids"] == ids:
            chosen.append(cut)
        if len(chosen) == n:
            return chosen
    raise SystemExit(f"not {n} prompts of {tokens} tokens in the corpus")


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakRise:
    """The rise of the process's peak resident set over a block, above its resident set when the block began
    (``/proc/self/clear_refs`` resets the high-water mark): the call's own working memory, not the model's
    weights or the libraries each approach imports."""

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")
        self.before = status_mb("VmRSS")
        return self

    def __exit__(self, *exc):
        self.mb = status_mb("VmHWM") - self.before


def run_nnterp(path: str, sources: list[str], layers: list[int]):
    import torch
    from nnterp import StandardizedTransformer
    from nnterp.interventions import patchscope_lens, repeat_prompt

    model = StandardizedTransformer(path, device_map="cpu")
    patchscope_lens(model, sources[:1], repeat_prompt(), layers=layers[:1])  # warm-up
    start = time.perf_counter()
    with PeakRise() as peak:
        probs = patchscope_lens(model, sources, repeat_prompt(), layers=layers)  # [source, layer, vocab]
    seconds = time.perf_counter() - start
    top = probs.float().max(dim=-1)
    return seconds, top.indices.tolist(), top.values.tolist(), peak.mb


def run_lens_plugins(path: str, sources: list[str], layers: list[int]):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lens_plugins as lp

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = lp.nnsight.wrap_model(AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer)
    n = model._module.config.num_hidden_layers
    rows = [f"{layer + 1}_pre" if layer + 1 < n else f"{layer}_post" for layer in layers]
    target = torch.tensor(tokenizer(TARGET)["input_ids"])
    ids = [torch.tensor([tokenizer(s)["input_ids"]]) for s in sources]
    lp.nnsight.run_patchscope(model, ids[0], layers=rows[:1], positions=[-1], target_prompt=target)  # warm-up
    start = time.perf_counter()
    with PeakRise() as peak:
        results = [lp.nnsight.run_patchscope(model, i, layers=rows, positions=[-1], target_prompt=target) for i in ids]
    seconds = time.perf_counter() - start
    # top_ids / top_probs: [row, batch, pos, k] -> per source, per row
    top_ids = [r.top_ids[:, 0, -1, 0].tolist() for r in results]
    top_probs = [r.top_probs[:, 0, -1, 0].tolist() for r in results]
    return seconds, top_ids, top_probs, peak.mb


def run_loop(path: str, sources: list[str], layers: list[int]):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    blocks = model.model.layers
    target = torch.tensor([tokenizer(TARGET)["input_ids"]])

    def patch(hidden):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            out = out.clone()
            out[0, -1] = hidden
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
        return hook

    def one_source(text, chosen):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        hidden = model(ids, output_hidden_states=True).hidden_states  # [embed, block 0 out, ..., final norm]
        last = []
        handle = blocks[-1].register_forward_hook(lambda m, a, o: last.append(o[0] if isinstance(o, tuple) else o))
        model(ids)
        handle.remove()
        states = list(hidden[1:-1]) + [last[0]]  # block l's output (the last before the final norm)
        tops = []
        for layer in chosen:
            handle = blocks[layer].register_forward_hook(patch(states[layer][0, -1]))
            probs = model(target).logits[0, -1].float().softmax(-1)
            handle.remove()
            tops.append(probs.max(-1))
        return [t.indices.item() for t in tops], [t.values.item() for t in tops]

    with torch.no_grad():
        one_source(sources[0], layers[:1])  # warm-up
        start = time.perf_counter()
        with PeakRise() as peak:
            outs = [one_source(s, layers) for s in sources]
        seconds = time.perf_counter() - start
    return seconds, [o[0] for o in outs], [o[1] for o in outs], peak.mb


def child(approach: str, path: str, sources: list[str], layers: list[int], out: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    run = {"nnterp": run_nnterp, "lens_plugins_nnsight": run_lens_plugins, "loop": run_loop}[approach]
    seconds, ids, probs, rise = run(path, sources, layers)
    import torch

    Path(out).write_text(json.dumps({"approach": approach, "seconds": seconds, "ids": ids, "probs": probs,
                                     "threads": torch.get_num_threads(), "peak_rise_mb": rise,
                                     "peak_rss_mb": status_mb("VmHWM")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="each source prompt's length in tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        approach, spec, out = args.child
        setup = json.loads(Path(spec).read_text())
        child(approach, setup["path"], setup["sources"], setup["layers"], out)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cpu import cpu_description
    from transformers import AutoConfig, AutoTokenizer

    path = model_copy()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sources = sources_for(tokenizer, args.sources, args.tokens)
    layers = list(range(AutoConfig.from_pretrained(path).num_hidden_layers))
    pairs = len(sources) * len(layers)
    peer = venv_python()
    work = Path(tempfile.mkdtemp(prefix="bench-patchscope-"))
    spec = work / "setup.json"
    spec.write_text(json.dumps({"path": str(path), "sources": sources, "layers": layers}))
    print(f"CPU: {cpu_description()}; load average at start {os.getloadavg()}")
    print(f"{len(sources)} sources x {len(layers)} blocks = {pairs} pairs; target {TARGET!r}; rounds {args.rounds}")
    runs: dict = {a: [] for a in APPROACHES}
    for round_ in range(args.rounds):
        for approach in APPROACHES if round_ % 2 == 0 else APPROACHES[::-1]:
            out = work / f"{approach}_{round_}.json"
            python = str(peer) if approach == "nnterp" else sys.executable
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            if approach == "nnterp":
                env.pop("PYTHONPATH", None)
            done = subprocess.run([python, os.path.abspath(__file__), "--child", approach, str(spec), str(out)],
                                  env=env, capture_output=True, text=True, cwd=str(work))
            if done.returncode != 0:
                raise SystemExit(f"{approach} failed:\n{done.stderr[-3000:]}")
            result = json.loads(out.read_text())
            result["load"] = os.getloadavg()[0]
            runs[approach].append(result)
            print(json.dumps({k: v for k, v in result.items() if k not in ("ids", "probs")}), flush=True)
    reference = runs["loop"][0]
    print(f"CPU: {cpu_description()}; load average at end {os.getloadavg()}")
    print("| approach | pairs/s (median) | seconds | vs nnterp | vs loop | peak memory rise (MB) | top-1 ids equal to the loop's | "
          "max abs diff of top-1 probability |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    median = {a: statistics.median(r["seconds"] for r in rs) for a, rs in runs.items()}
    for approach, rs in runs.items():
        last = rs[-1]
        same = sum(a == b for x, y in zip(last["ids"], reference["ids"]) for a, b in zip(x, y))
        diff = max(abs(a - b) for x, y in zip(last["probs"], reference["probs"]) for a, b in zip(x, y))
        print(f"| {approach} | {pairs / median[approach]:.1f} | {median[approach]:.2f} | "
              f"{median['nnterp'] / median[approach]:.2f}x | {median['loop'] / median[approach]:.2f}x | "
              f"{statistics.median(r['peak_rise_mb'] for r in rs):.0f} | {same}/{pairs} | {diff:.2e} |")


if __name__ == "__main__":
    main()
