"""How far a bfloat16 or float16 copy of the model drifts from float32, seen through the lens.

This is a measurement of the CPU's half-precision kernels (they round the model's own forward pass
differently on different CPUs), not a property of the lens: the lens decodes whatever residuals it is
given in float32 (tests/test_hardening.py asserts that on any CPU). The output is the README's
"Half precision" table, with the CPU it was measured on.

    python benchmarks/bench_half_precision.py [--prompt TEXT]
"""

import argparse
import copy
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from cpu import cpu_description  # noqa: E402

import lens_plugins as lp  # noqa: E402
from lens_plugins.models import default_model_dir, load_hf_model  # noqa: E402

REDUCTIONS = ("top_k", "entropy", "kl_final_row", "kl_row_final", "js_final", "final_top1", "next_token")
STATISTICS = {  # README row label -> how to read it from a LensResult
    "entropy (nats)": lambda r: r.entropy,
    "kl_final_row (nats)": lambda r: r.kl_final_row,
    "kl_row_final (nats)": lambda r: r.kl_row_final,
    "js_final (nats)": lambda r: r.js_final,
    "next-token log-prob": lambda r: r.next_token_logprob,
    "top-k log-probs": lambda r: r.top_logprobs,
    "cross-entropy per row": lambda r: r.cross_entropy(),
}


def max_difference(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Max |ours - reference| over every row, and over the final row (NaN where nothing is scored)."""
    diff = (ours - reference).abs().nan_to_num()
    return diff.max().item(), diff[-1].max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="In 1905 Albert Einstein published four papers that changed physics")
    args = parser.parse_args()
    model, tokenizer = load_hf_model(default_model_dir())
    run = lambda m: lp.nnsight.run_logit_lens(lp.nnsight.wrap_model(m, tokenizer), args.prompt, top_k=5,  # noqa: E731
                                              reductions=REDUCTIONS)
    reference = run(model)
    dtypes = (torch.bfloat16, torch.float16)
    results = {dtype: run(copy.deepcopy(model).to(dtype)) for dtype in dtypes}

    print(f"SmolLM2-135M-Instruct, {args.prompt!r} ({reference.token_ids.shape[1]} tokens, "
          f"{len(reference.labels)} rows); nnsight backend; CPU: {cpu_description()}")
    print("Largest |half - float32| over every row and position, as *every row / final row*:\n")
    print("| statistic | bfloat16 | float16 |\n|---|---|---|")
    for label, read in STATISTICS.items():
        cells = []
        for dtype in dtypes:
            every, final = max_difference(read(results[dtype]), read(reference))
            cells.append(f"{every:.2g} / {final:.2g}")
        print(f"| {label} | {' | '.join(cells)} |")
    cells = []
    for dtype in dtypes:
        top1 = (results[dtype].top_ids[..., 0] == reference.top_ids[..., 0]).float().mean().item()
        final = (results[dtype].final_top1 == reference.final_top1).float().mean().item()
        cells.append(f"{100 * top1:.1f}% / {100 * final:.0f}%")
    print(f"| top-1 equal to float32's (all rows / final row) | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
