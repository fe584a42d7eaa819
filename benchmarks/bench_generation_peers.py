"""The lens over generated text: one in-trace request against a trace per generated token.

``lp.nnsight.run_generation_lens`` lenses every step inside one ``model.generate(...)`` (one request, also on
NDIF); what one writes without it is a loop that runs the lens on the prompt plus the tokens so far, once per
new token, and appends the model's own greedy choice. Both run on SmolLM2-135M-Instruct, greedy, the same
prompt; every run saves the generated ids and each step's top-1 per row, and the parent checks that the two
approaches generated the same tokens and read the same top-1 at every row of every step.

Approaches, each in a fresh process (model loaded and run once untimed first), alternating, medians over
``--rounds``:
- ``in_trace``: ``lp.nnsight.run_generation_lens(model, prompt, max_new_tokens=N)``;
- ``per_step_traces``: ``N`` calls of ``lp.nnsight.run_logit_lens(model, {"input_ids": ids, ...},
  positions=[-1])``, each on the token ids so far (its key/value cache is not kept between calls, as in any per-step loop of one-call traces).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_generation_peers.py --tokens 16 --rounds 3``
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

APPROACHES = ("in_trace", "per_step_traces")
PROMPT = "The capital of France is"


def child(approach: str, tokens: int, out: str) -> None:
    import warnings

    import torch

    import lens_plugins as lp

    warnings.filterwarnings("ignore")
    model = lp.load_default_model(backend="nnsight")
    prompt_ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])

    def in_trace(n):
        result = lp.nnsight.run_generation_lens(model, prompt_ids, max_new_tokens=n)
        generated = result.generated_ids()
        return generated, [result.top_ids[:, 0, i, 0].tolist() for i in range(len(generated))]

    def per_step(n):
        ids, tops = prompt_ids, []
        for _ in range(n):
            result = lp.nnsight.run_logit_lens(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                               positions=[-1])
            top = result.top_ids[:, 0, -1, 0]
            tops.append(top.tolist())
            ids = torch.cat([ids, top[-1].reshape(1, 1)], dim=1)  # the last row is the model's own output
        return ids[0, prompt_ids.shape[1]:].tolist(), tops

    run = in_trace if approach == "in_trace" else per_step
    run(2)  # warm-up
    start = time.perf_counter()
    generated, tops = run(tokens)
    seconds = time.perf_counter() - start
    Path(out).write_text(json.dumps({"approach": approach, "seconds": seconds, "generated": generated, "tops": tops,
                                     "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.tokens, args.child[1])
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cpu import cpu_description

    work = Path(tempfile.mkdtemp(prefix="bench-generation-"))
    print(f"CPU: {cpu_description()}; load average at start {os.getloadavg()}")
    print(f"prompt {PROMPT!r}, {args.tokens} new tokens, greedy; rounds {args.rounds}")
    runs: dict = {a: [] for a in APPROACHES}
    for round_ in range(args.rounds):
        for approach in APPROACHES if round_ % 2 == 0 else APPROACHES[::-1]:
            out = work / f"{approach}_{round_}.json"
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--tokens", str(args.tokens),
                                   "--child", approach, str(out)],
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{approach} failed:\n{done.stderr[-3000:]}")
            result = json.loads(out.read_text()) | {"load": os.getloadavg()[0]}
            runs[approach].append(result)
            print(json.dumps({k: v for k, v in result.items() if k not in ("tops",)}), flush=True)
    a, b = runs["in_trace"][-1], runs["per_step_traces"][-1]
    same_tokens = a["generated"] == b["generated"]
    cells = sum(len(row) for row in a["tops"])
    same_top1 = sum(x == y for ra, rb in zip(a["tops"], b["tops"]) for x, y in zip(ra, rb))
    median = {k: statistics.median(r["seconds"] for r in rs) for k, rs in runs.items()}
    print(f"CPU: {cpu_description()}; load average at end {os.getloadavg()}")
    print(f"same generated tokens: {same_tokens}; same top-1 in {same_top1}/{cells} (row, step) cells")
    print("| approach | tokens/s (median) | seconds | x per-step traces |")
    print("|---|---:|---:|---:|")
    for approach in APPROACHES:
        print(f"| {approach} | {args.tokens / median[approach]:.2f} | {median[approach]:.2f} | "
              f"{median['per_step_traces'] / median[approach]:.2f}x |")


if __name__ == "__main__":
    main()
