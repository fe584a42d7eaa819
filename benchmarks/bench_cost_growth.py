"""How the lens's cost grows: readout time and peak memory against tokens and against vocabulary size.

Each point is a fresh process that builds a ``[31 rows, tokens, 576]`` residual stack and times one
``lens_statistics`` call (the default reductions: top-5, entropy, KL both ways, final top-1 and next-token
ranks) after one warm-up call on 16 tokens; peak memory is the rise of ``VmHWM`` over the timed call (the
high-water mark is reset first through ``/proc/self/clear_refs``).

- tokens: SmolLM2-135M's own decoder, and its real residual rows on 256 tokens of the built-in corpus,
  repeated along the token axis to reach 64 ... 2,048 (8,192 with ``--tokens``): the values, and so the
  readout's data-dependent branches (top-k merges, rank counts), are a real model's.
- vocabulary: the same rows through a random ``[576, vocab]`` unembedding of 49,152 (SmolLM2) and 262,144
  (Gemma-3) columns, at each of ``--vocab-tokens`` token counts. Gemma-3's weights are not available offline here; the
  readout's cost depends on the shapes only, not on which model made ``W_U``.

The materialised alternative (``[rows, tokens, vocab]`` float32 log-probs, what a naive lens or
TransformerLens's ``logit_lens`` tool holds) is printed beside each memory figure.

    python benchmarks/bench_cost_growth.py [--tokens 64 128 256 512 1024 2048] [--vocab-tokens 64 256 1024]
        [--rounds 1] [--markdown] [--plot docs/method_images/cost_growth.png] [--from-log LOG]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROWS, D_MODEL = 31, 576


def vm_hwm_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def smollm2_stack_and_decoder():
    import torch

    from lens_plugins.core import architectures
    from lens_plugins.models import default_model_dir, load_hf_model
    from lens_plugins.training.loop import builtin_corpus

    model, tokenizer = load_hf_model(default_model_dir())
    ids = tokenizer(" ".join(builtin_corpus()[:3]), return_tensors="pt").input_ids[:, :256]
    last = []
    handle = model.model.layers[-1].register_forward_hook(
        lambda module, args, output: last.append(output[0] if isinstance(output, tuple) else output))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    handle.remove()
    stack = torch.stack(list(hidden[:-1]) + [last[0]])[:, 0].detach()
    return stack, architectures.decoder_tensors(model, architectures.resolve(model)).detached()


def child(kind: str, tokens: int, vocab: int) -> dict:
    """One measurement in this (fresh) process."""
    import dataclasses

    import torch

    from lens_plugins.core.readout import lens_statistics

    base, decoder = smollm2_stack_and_decoder()
    if vocab != decoder.W_U.shape[1]:
        g = torch.Generator().manual_seed(0)
        scale = decoder.W_U.std().item()
        decoder = dataclasses.replace(decoder, W_U=torch.randn(D_MODEL, vocab, generator=g) * scale)
    stack = base.repeat(1, -(-tokens // base.shape[1]), 1)[:, :tokens].contiguous()
    targets = torch.randint(0, vocab, (tokens, 1), generator=torch.Generator().manual_seed(1))
    lens_statistics(stack[:, :16], decoder, 5, targets[:16])  # warm-up: kernels, thread pool
    reset = reset_hwm()
    before = vm_hwm_kb()
    start = time.perf_counter()
    lens_statistics(stack, decoder, 5, targets)
    seconds = time.perf_counter() - start
    return {"kind": kind, "tokens": tokens, "vocab": vocab, "seconds": seconds,
            "peak_mb": (vm_hwm_kb() - before) / 1024 if reset else float("nan"),
            "materialised_mb": ROWS * tokens * vocab * 4 / 2**20, "threads": torch.get_num_threads()}


def run_child(kind: str, tokens: int, vocab: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", kind, str(tokens), str(vocab)],
                          check=False, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load"] = os.getloadavg()[0]
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def table(results: list[dict]) -> str:
    by_point: dict = {}
    for r in results:
        by_point.setdefault((r["kind"], r["tokens"], r["vocab"]), []).append(r)
    header = ("| sweep | tokens | vocab | lens time (s) | time / (tokens x vocab) (ns) | peak memory rise (MB) | "
              "materialised log-probs (MB) | load avg |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (kind, tokens, vocab), rs in sorted(by_point.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        t = statistics.median(r["seconds"] for r in rs)
        mem = statistics.median(r["peak_mb"] for r in rs)
        lines.append(f"| {kind} | {tokens} | {vocab} | {t:.2f} | {t / (tokens * vocab) * 1e9:.3f} | {mem:.0f} | "
                     f"{rs[0]['materialised_mb']:.0f} | {statistics.median(r['load'] for r in rs):.1f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> str:
    """Time and peak memory against tokens, one line per vocabulary size, on one PNG: a plotly figure drawn by
    the package's own route (Debian's Chromium through Playwright, as ``docs/gallery.py``), so no plotting
    library beyond the package's dependencies is needed."""
    import shutil
    import tempfile
    from pathlib import Path

    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if not executable:
        return "no chromium on PATH (make browser): no plot (the table above holds the same figures)"
    fig = make_subplots(rows=1, cols=2, subplot_titles=("readout time, 31 rows (s)", "peak memory rise (MB)"))
    colours = ["#1f77b4", "#d62728", "#2ca02c"]
    for index, vocab in enumerate(sorted({r["vocab"] for r in results})):
        colour = colours[index % len(colours)]
        points: dict = {}
        for r in results:
            if r["vocab"] == vocab:
                points.setdefault(r["tokens"], []).append(r)
        xs = sorted(points)
        name = f"vocab {vocab:,}" + (" (SmolLM2)" if vocab == 49152 else " (random W_U, Gemma-3's size)")
        fig.add_trace(go.Scatter(x=xs, y=[statistics.median(r["seconds"] for r in points[x]) for x in xs],
                                 mode="lines+markers", name=name, legendgroup=name, line={"color": colour}),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=xs, y=[statistics.median(r["peak_mb"] for r in points[x]) for x in xs],
                                 mode="lines+markers", name=name, legendgroup=name, showlegend=False,
                                 line={"color": colour}), row=1, col=2)
        fig.add_trace(go.Scatter(x=xs, y=[points[x][0]["materialised_mb"] for x in xs], mode="lines",
                                 line={"dash": "dot", "color": colour},
                                 name=f"materialised [rows, tokens, vocab] float32 log-probs, vocab {vocab:,}"),
                      row=1, col=2)
    fig.update_xaxes(type="log", title_text="tokens", dtick=1)  # decades only: no cluttered minor labels
    fig.update_yaxes(type="log", dtick=1)
    fig.update_layout(width=1100, height=450, template="plotly_white", legend={"orientation": "h", "y": -0.25},
                      margin={"t": 40, "b": 120})
    from playwright.sync_api import sync_playwright

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        html = Path(tmp) / "plot.html"
        fig.write_html(html, include_plotlyjs=True, config={"displayModeBar": False})
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1150, "height": 500}, device_scale_factor=1)
        page.goto(html.resolve().as_uri())
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 1", timeout=60_000)
        page.locator(".js-plotly-plot").first.screenshot(path=path)
        browser.close()
    return f"plot written to {path}"


def from_log(path: str) -> list[dict]:
    """The measurements a earlier run printed (one JSON object per line), to redraw the table and the plot."""
    with open(path) as log:
        return [json.loads(line) for line in log if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 262144])
    parser.add_argument("--vocab-tokens", type=int, nargs="+", default=[64, 256, 1024],
                        help="token counts at which each --vocab other than SmolLM2's own is measured")
    parser.add_argument("--from-log", metavar="LOG", help="redraw the table and plot from an earlier run's log")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--plot", metavar="PNG")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, tokens, vocab = args.child
        print(json.dumps(child(kind, int(tokens), int(vocab))))
        return
    if args.from_log:
        results = from_log(args.from_log)
        print(table(results))
        if args.plot:
            print(plot(results, args.plot))
        return
    from cpu import cpu_description

    print(f"CPU: {cpu_description()}; load average at start {os.getloadavg()}", file=sys.stderr)
    points = [("tokens", t, 49152) for t in args.tokens]
    points += [("vocab", t, v) for v in args.vocab if v != 49152 for t in args.vocab_tokens]
    results = []
    for round_ in range(args.rounds):  # the order alternates between rounds
        for point in points if round_ % 2 == 0 else points[::-1]:
            results.append(run_child(*point))
    print(f"CPU: {cpu_description()}; load average at end {os.getloadavg()}")
    if args.markdown:
        print(table(results))
    if args.plot:
        print(plot(results, args.plot))


if __name__ == "__main__":
    main()
