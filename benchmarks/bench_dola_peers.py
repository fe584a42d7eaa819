"""DoLa tokens/s: lens_plugins (nnsight and TransformerLens) against transformers 4.x ``generate(dola_layers=)``.

Same model (SmolLM2-135M-Instruct from the local files; transformers 4 reads a copy whose ``config.json``
names ``rope_theta`` the 4.x way), same prompt, greedy, ``--steps`` new tokens, ``layers="high"``,
``repetition_penalty=1.2`` and ``premature_norm=False`` (transformers 4's definition, so both produce the same
tokens: the benchmark checks it). Each measurement is a fresh process (model loaded and one 2-token warm-up
untimed); approaches alternate within a round and the order rotates between rounds; figures are medians.
The reference runs in the throwaway venv ``compare_dola_transformers4.reference_python`` builds (never the
project's). A plain greedy ``generate`` without DoLa in transformers 5 is timed too: the floor.

    python benchmarks/bench_dola_peers.py [--steps 32] [--rounds 3]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROMPT = "The capital of France is"
APPROACHES = ("transformers4_dola", "lens_plugins_nnsight", "lens_plugins_transformer_lens", "hf5_greedy_floor")

REFERENCE = r'''
import json, sys, time, torch, transformers
model_dir, ids, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
ids = torch.tensor([ids])
def run(n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, dola_layers="high", repetition_penalty=1.2, pad_token_id=2)
run(2)
start = time.perf_counter()
out = run(steps)
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": out[0].tolist()[len(ids[0]):],
                  "threads": torch.get_num_threads(), "version": transformers.__version__}))
'''


def ours(approach: str, steps: int) -> dict:
    import torch

    import lens_plugins as lp
    from lens_plugins.models import default_model_dir, load_hf_model

    hf, tokenizer = load_hf_model(default_model_dir())
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    kwargs = {"layers": "high", "repetition_penalty": 1.2, "premature_norm": False}
    if approach == "hf5_greedy_floor":
        def run(n):
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, repetition_penalty=1.2, pad_token_id=2)
            return out[0].tolist()[ids.shape[1]:]
    elif approach == "lens_plugins_nnsight":
        model = lp.nnsight.wrap_model(hf, tokenizer)

        def run(n):
            return lp.nnsight.run_dola(model, ids, max_new_tokens=n, **kwargs).token_ids.tolist()[ids.shape[1]:]
    else:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers("SmolLM2-135M-Instruct", hf_model=hf, tokenizer=tokenizer).eval()

        def run(n):
            return lp.transformer_lens.run_dola(bridge, ids, max_new_tokens=n, **kwargs).token_ids.tolist()[ids.shape[1]:]
    run(2)
    start = time.perf_counter()
    tokens = run(steps)
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "threads": torch.get_num_threads()}


def t4_model_dir(tmp: str) -> str:
    from lens_plugins.models import default_model_dir

    target = Path(tmp) / "smollm2-t4"
    target.mkdir()
    for path in default_model_dir().iterdir():
        shutil.copy(path, target / path.name)
    config = json.loads((target / "config.json").read_text())
    if "rope_parameters" in config:
        config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def measure(approach: str, steps: int, model_dir: str, ids: list) -> dict:
    if approach == "transformers4_dola":
        from compare_dola_transformers4 import reference_python

        command = [reference_python(), "-c", REFERENCE, model_dir, json.dumps(ids), str(steps)]
    else:
        command = [sys.executable, __file__, "--child", approach, "--steps", str(steps)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{approach}: {done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(approach=approach, load=os.getloadavg()[0], tokens_per_s=steps / result["seconds"])
    print(json.dumps({k: v for k, v in result.items() if k != "tokens"}), file=sys.stderr, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--approaches", nargs="+", choices=APPROACHES, default=list(APPROACHES))
    parser.add_argument("--child", choices=APPROACHES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(ours(args.child, args.steps)))
        return 0
    from cpu import cpu_description

    from lens_plugins.models import default_model_dir, load_hf_model

    print(f"CPU: {cpu_description()}; load average at start {os.getloadavg()}", file=sys.stderr)
    _, tokenizer = load_hf_model(default_model_dir())
    ids = tokenizer(PROMPT)["input_ids"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = t4_model_dir(tmp)
        for round_ in range(args.rounds):
            order = args.approaches[round_ % len(args.approaches):] + args.approaches[:round_ % len(args.approaches)]
            results.extend(measure(a, args.steps, model_dir, ids) for a in order)
    by = {a: [r for r in results if r["approach"] == a] for a in args.approaches}
    medians = {a: statistics.median(r["tokens_per_s"] for r in rs) for a, rs in by.items()}
    reference = by.get("transformers4_dola", [{}])[0].get("tokens")
    print(f"CPU: {cpu_description()}; load average at end {os.getloadavg()}; {args.steps} new tokens, "
          f"{args.rounds} rounds, fresh processes")
    print("| approach | tokens/s (median) | vs transformers 4 DoLa | same tokens as transformers 4 | load avg |")
    print("|---|---:|---:|---|---:|")
    for a, rs in by.items():
        same = "reference" if a == "transformers4_dola" else ("n/a (no DoLa)" if a == "hf5_greedy_floor" else
                                                              str(all(r["tokens"] == reference for r in rs)))
        ratio = medians[a] / medians["transformers4_dola"] if "transformers4_dola" in medians else float("nan")
        print(f"| {a} | {medians[a]:.2f} | {ratio:.2f}x | {same} | {statistics.median(r['load'] for r in rs):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
