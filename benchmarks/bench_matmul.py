"""The lens's unembedding tiles on a CPU: ``torch.matmul`` (MKL's float32 GEMM) against oneDNN's.

The readout (``lens_plugins.core.readout``) computes the logits of a block of ``rows x tokens`` vectors one
vocabulary chunk at a time; on an x86 CPU it calls oneDNN for these matmuls (``readout.onednn_matmul``). This
benchmark is the measurement behind that choice, at SmolLM2-135M's shapes by default (a 256-token lens: tiles
of 31 x 128 = 3,968 vectors by 512 columns of a 576 x 49,152 ``W_U``, held like ``lm_head.weight``, i.e. as
``[vocab, d_model]`` rows): one sweep over the whole vocabulary per timing, each library in fresh processes,
alternating (the order rotates between rounds), medians of ``--rounds``. It also prints each library's largest
error against a float64 product of the same operands: both accumulate in float32, so both errors should be
float32 rounding of the terms (a few units in the last place of the largest logits), not a lower precision.

    python benchmarks/bench_matmul.py [--vectors 3968] [--width 512] [--rounds 3] [--markdown]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lens_plugins.core import readout  # noqa: E402

LIBRARIES = ("mkl", "onednn")
LABELS = {"mkl": "`torch.matmul` (MKL)", "onednn": "oneDNN (`torch.ops.mkldnn._linear_pointwise`), the readout's"}


def sweep(library, vectors, width, d_model, vocab, repeats):
    """The readout's own ``Unembedding`` tiles with oneDNN on or off, ``{seconds, max_error, float32_bound}``:
    ``repeats`` timed sweeps over the vocabulary (after an untimed one), and the first tile's largest error
    against float64 with the bound that float32 accumulation guarantees."""
    g = torch.Generator().manual_seed(0)
    W_rows = torch.randn(vocab, d_model, generator=g) / d_model**0.5  # lm_head.weight: W_U is its transpose
    a = torch.randn(vectors, d_model, generator=g)
    out = torch.empty(vectors, width)
    W_U = W_rows.T

    unembedding = readout.Unembedding(W_U, None, None, "float32")
    unembedding.onednn = library == "onednn"  # what readout.onednn_matmul chooses on an x86 CPU, or not

    def tile(v0, v1):
        return unembedding.logits(a, unembedding.chunk(v0, v1), out[:, :v1 - v0])

    def run():
        for v0 in range(0, vocab, width):
            tile(v0, min(v0 + width, vocab))

    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    reference = a.double() @ W_U[:, :width].double()
    error = float((tile(0, width).double() - reference).abs().max())
    # A float32 dot product of d terms is within about d * 2^-24 of the sum of its terms' sizes (any order).
    bound = float((a.double().abs() @ W_U[:, :width].double().abs()).max()) * d_model * 2.0**-24
    return {"seconds": seconds, "max_error": error, "float32_bound": bound}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=31 * 128)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed sweeps per process (the median is kept)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--child", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.vectors, args.width, args.d_model, args.vocab)
    if args.child:
        print(json.dumps(sweep(args.child, *shape, args.repeats)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpu import cpu_description

    results = {library: [] for library in LIBRARIES}
    for round_ in range(args.rounds):
        order = LIBRARIES[round_ % 2:] + LIBRARIES[:round_ % 2]
        for library in order:
            command = [sys.executable, __file__, "--child", library, "--vectors", str(args.vectors), "--width",
                       str(args.width), "--d-model", str(args.d_model), "--vocab", str(args.vocab),
                       "--repeats", str(args.repeats)]
            result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
            results[library].append(result)
            print(f"  round {round_ + 1} {library}: {result}", file=sys.stderr, flush=True)

    flops = 2 * args.vectors * args.d_model * args.vocab
    median = {lib: statistics.median(statistics.median(r["seconds"]) for r in rs) for lib, rs in results.items()}
    print(f"{args.vectors} x {args.d_model} @ {args.d_model} x {args.vocab} in {args.width}-column tiles, float32; "
          f"{cpu_description()}; medians of {args.rounds} fresh-process rounds")
    rows = []
    for library in LIBRARIES:
        error = max(r["max_error"] for r in results[library])
        bound = min(r["float32_bound"] for r in results[library])
        rows.append((LABELS[library], f"{median[library] * 1e3:.0f} ms", f"{flops / median[library] / 1e9:.0f}",
                     f"{median[library] / median['mkl']:.2f}x", f"{error:.1e} (float32 bound {bound:.1e})"))
    head = ("library", "one sweep", "GFLOP/s", "x MKL", "max error vs float64")
    if args.markdown:
        print("| " + " | ".join(head) + " |\n| " + " | ".join("---" for _ in head) + " |")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        for row in rows:
            print("  ".join(row))


if __name__ == "__main__":
    main()
