"""Would a compiled, fused reduction kernel bring the CPU readout under the floor on a first call (issue 31, item 4)?

The readout's cost on a CPU is its tiles' float32 matmuls plus about a dozen elementwise passes over each tile
(max, ``exp``, sums, three dot products, two rank counts), each an ATen kernel that streams the 8 MB tile
through the cache again. One compiled kernel could do them in one sweep per row while the row is in L1, but
only a run-time compiler (TorchInductor: a C++ compiler on the user's machine) can build it, and a process
pays to load it. This benchmark measures both sides on SmolLM2-135M's real residual rows (31 rows x 256 tokens,
the tiles ``tile_sizes`` picks), each figure the **first call in a fresh process** (model and data loaded
untimed), approaches alternating, medians:

- ``readout``: ``core.readout.lens_statistics`` as shipped (default reductions, one target per token)
- ``matmuls``: the same tiles' matmuls and final-row copies alone (``readout._Tiles``), no reduction: what
  any implementation pays
- ``matmuls + AOTInductor kernel``: those tiles, each then reduced by one ahead-of-time compiled kernel
  (max, sum of ``exp``, the three dot products, two counts: the tile-sized work of the default reductions, no
  top-k, no running sums, so a lower bound for a fused readout); timed from ``import torch._inductor``, which
  loading the kernel needs, through loading the package built beforehand (untimed; its build time is printed)
- ``matmuls + torch.compile kernel``: the same kernel through ``torch.compile`` with its cache already warm

One thread (the cell of ``bench_cpu_robustness.py`` this concerns): with two, the readout runs two token blocks
at a time (``readout._map_blocks``) and these tiles would not.

    python benchmarks/bench_fused_reductions.py [--rounds 3]
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

HERE = Path(__file__).resolve().parent
APPROACHES = ("readout", "matmuls", "aoti", "compile")
LABELS = {"readout": "readout as shipped (`lens_statistics`)",
          "matmuls": "its tiles' matmuls alone (no reduction)",
          "aoti": "matmuls + one AOTInductor-compiled reduction kernel per tile",
          "compile": "matmuls + the same kernel via `torch.compile` (warm cache)"}


def reduce_tile(tile, thresholds):
    """The tile-sized work of the default reductions in one function, for a compiler to fuse: per row and
    token, the max, the sum of ``exp(l - max)``, the dot products of ``p`` with the row's own logits, with the
    final row's and (under the final row's ``p``) with each row's, and two counts of logits above a threshold."""
    import torch

    m = tile.amax(-1, keepdim=True)
    p = torch.exp(tile - m)
    own = (p * tile).sum(-1)
    final = (p * tile[-1]).sum(-1)
    under_final = (p[-1] * tile).sum(-1)
    above = [(tile > thresholds[..., j:j + 1]).sum(-1) for j in range(2)]
    return m.squeeze(-1), p.sum(-1), own, final, under_final, above[0], above[1]


def setup():
    import torch

    sys.path.insert(0, str(HERE))
    from bench_cost_growth import smollm2_stack_and_decoder

    from lens_plugins.core import readout

    torch.set_grad_enabled(False)
    stack, decoder = smollm2_stack_and_decoder()
    tokens = stack.shape[1]
    targets = torch.randint(0, decoder.W_U.shape[1], (tokens, 1), generator=torch.Generator().manual_seed(1))
    width, token_chunk = readout.tile_sizes(stack.device, stack.shape[0], tokens, decoder.W_U.shape[1])
    return torch, readout, stack, decoder, targets, width, token_chunk


def tiles(readout, stack, decoder, width, token_chunk):
    """Every tile the readout computes, as it computes them (one reused buffer per block)."""
    unembedding = readout.Unembedding(decoder.W_U, decoder.b_U, decoder.softcap, "float32")
    scratch = readout._Scratch(stack.device)
    threads = (readout._ThreadChoice(stack.device), readout._ThreadChoice(stack.device))
    for n0 in range(0, stack.shape[1], token_chunk):
        normed = decoder.normalize(stack[:, n0:n0 + token_chunk])
        for _, tile in readout._Tiles(normed, unembedding, width, True, scratch, threads):
            yield tile


def thresholds_for(torch, tile):
    """Two thresholds per row and token (the logits of two fixed columns): the counts' work does not depend
    on their values."""
    return torch.stack([tile[..., 3], tile[..., -5]], dim=-1).contiguous()


def child(approach: str, package: str) -> dict:
    torch, readout, stack, decoder, targets, width, token_chunk = setup()
    fixed = 0.0
    start = time.perf_counter()
    if approach == "readout":
        readout.lens_statistics(stack, decoder, 5, targets)
    elif approach == "matmuls":
        for _ in tiles(readout, stack, decoder, width, token_chunk):
            pass
    elif approach == "aoti":
        import torch._inductor

        kernel = torch._inductor.aoti_load_package(package)
        fixed = time.perf_counter() - start
        for tile in tiles(readout, stack, decoder, width, token_chunk):
            kernel(tile, thresholds_for(torch, tile))
    else:
        kernel = torch.compile(reduce_tile, dynamic=False)
        for i, tile in enumerate(tiles(readout, stack, decoder, width, token_chunk)):
            before = time.perf_counter()
            kernel(tile, thresholds_for(torch, tile))
            if i == 0:  # tracing, and loading the kernel from the warm cache
                fixed = time.perf_counter() - before
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "fixed": fixed, "threads": torch.get_num_threads(),
            "tile": [stack.shape[0], token_chunk, width], "load": round(os.getloadavg()[0], 2)}


def build(package: str) -> dict:
    """The AOTInductor package for the readout's tile shape, and a warm ``torch.compile`` cache."""
    torch, readout, stack, decoder, targets, width, token_chunk = setup()
    tile = next(iter(tiles(readout, stack, decoder, width, token_chunk))).clone()
    thresholds = thresholds_for(torch, tile)

    class Reduce(torch.nn.Module):
        def forward(self, tile, thresholds):
            return reduce_tile(tile, thresholds)

    start = time.perf_counter()
    exported = torch.export.export(Reduce(), (tile, thresholds))
    torch._inductor.aoti_compile_and_package(exported, package_path=package)
    aoti = time.perf_counter() - start
    start = time.perf_counter()
    torch.compile(reduce_tile, dynamic=False)(tile, thresholds)
    return {"aoti_build": aoti, "compile_cold": time.perf_counter() - start}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--package", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out = build(args.package) if args.child == "build" else child(args.child, args.package)
        print(json.dumps(out))
        return
    sys.path.insert(0, str(HERE))
    from cpu import cpu_description

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "inductor")}
        package = os.path.join(tmp, "reduce.pt2")

        def run(what):
            out = subprocess.run([sys.executable, __file__, "--child", what, "--package", package], env=env,
                                 capture_output=True, text=True, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        built = run("build")
        results = {a: [] for a in APPROACHES}
        for r in range(args.rounds):
            for approach in APPROACHES[r % len(APPROACHES):] + APPROACHES[:r % len(APPROACHES)]:
                results[approach].append(run(approach))
                print(f"  round {r + 1} {approach}: {results[approach][-1]}", file=sys.stderr, flush=True)
    first = results["readout"][0]
    cpu = cpu_description().replace(f"{torch_threads()} threads", f"{first['threads']} threads")
    print(f"# {cpu}; SmolLM2-135M, {first['tile'][0]} rows x 256 tokens, tiles of "
          f"{first['tile'][0]} x {first['tile'][1]} x {first['tile'][2]}; first call in a fresh process, "
          f"medians of {args.rounds} rounds")
    print(f"# one-time builds (not in the table): AOTInductor package {built['aoti_build']:.1f} s, "
          f"torch.compile from a cold cache {built['compile_cold']:.1f} s")
    base = statistics.median(r["seconds"] for r in results["readout"])
    print("| approach | first call | x readout | of which importing and loading the kernel | load average |")
    print("| --- | ---: | ---: | ---: | --- |")
    for approach in APPROACHES:
        seconds = statistics.median(r["seconds"] for r in results[approach])
        fixed = statistics.median(r["fixed"] for r in results[approach])
        loads = [r["load"] for r in results[approach]]
        print(f"| {LABELS[approach]} | {seconds:.2f} s | {seconds / base:.2f}x | "
              f"{f'{fixed:.2f} s' if fixed else '-'} | {min(loads):.1f}-{max(loads):.1f} |")


if __name__ == "__main__":
    main()
