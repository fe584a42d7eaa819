"""Activation patching on SmolLM2 over an IOI-style prompt set: how much of the logit difference
``logit(IO) - logit(S)`` each residual cell restores when patched from a source prompt that names the other
person second (normalised: 0 = the target's own, 1 = the source's), with seeded 95% bootstrap intervals over the
pairs; and the affected cone of the name's position read through the logit lens, rendered as
``docs/method_images/patching_cone.png`` with the system's Chromium (as ``docs/gallery.py``).

    PYTHONPATH=. python benchmarks/bench_patching.py [--figure]    # about a minute on 2 shared CPU cores
"""

import sys
import time
from pathlib import Path

import lens_plugins as lp

NAMES = [("John", "Mary", "store", "drink"), ("Tom", "Anna", "park", "ball"), ("James", "Sarah", "shop", "book"),
         ("David", "Emma", "beach", "hat"), ("Paul", "Lisa", "market", "gift"), ("Mark", "Kate", "house", "cake"),
         ("Peter", "Alice", "school", "pen"), ("George", "Laura", "office", "letter")]
ROWS = ["embed", "5_pre", "10_pre", "15_pre", "20_pre", "25_pre", "29_post"]
POSITIONS = [2, 9, 12, 13]  # " and" (the same in both prompts), the second name, " a" ... " to", the last token


def prompts(model):
    """(sources, targets, answers, foils): the pairs whose prompts tokenize to 14 tokens each (as the verbs do)."""
    from lens_plugins.backends._common import prompt_ids
    from lens_plugins.backends.transformer_lens.reader import hf_tokenizer

    sources, targets, answers, foils = [], [], [], []
    for s, io, place, thing in NAMES:
        target = f"When {s} and {io} went to the {place}, {io} gave a {thing} to"
        source = f"When {s} and {io} went to the {place}, {s} gave a {thing} to"
        lengths = {len(prompt_ids(hf_tokenizer(model), text, None)) for text in (source, target)}
        if lengths == {14}:
            sources.append(source), targets.append(target), answers.append(f" {io}"), foils.append(f" {s}")
    return sources, targets, answers, foils


def main(figure: bool):
    model = lp.load_default_model(backend="transformer_lens")
    sources, targets, answers, foils = prompts(model)
    start = time.perf_counter()
    res = lp.patching(model, sources, targets, answer=answers, foil=foils, layers=ROWS, positions=POSITIONS)
    elapsed = time.perf_counter() - start
    interval = res.interval(normalized=True, seed=0)
    tokens = res.target_tokens(0)
    print(f"{res.n_prompts} pairs, {len(res.labels)} rows x {len(res.positions)} positions, {elapsed:.1f} s")
    print("target logit diff (mean):", round(float(res.target_values.mean()), 2),
          " source:", round(float(res.source_values.mean()), 2))
    print("| row | " + " | ".join(f"{p}: `{tokens[p].strip() or tokens[p]}`" for p in POSITIONS) + " |")
    print("|---|" + "---|" * 4)
    for r, label in enumerate(res.labels):
        cells = [f"{interval.mean[r, i]:.2f} [{interval.low[r, i]:.2f}, {interval.high[r, i]:.2f}]"
                 for i in range(len(POSITIONS))]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if figure:
        render(lp.patching(model, sources[0], targets[0], answer=answers[0], foil=foils[0], layers=["10_pre"],
                           positions=[9], cone=True).plot_cone("10_pre", 9))


def render(plot, out=Path(__file__).parents[1] / "docs" / "method_images" / "patching_cone.png"):
    import shutil

    from playwright.sync_api import sync_playwright

    html = out.with_suffix(".html")
    plot.write_html(html, include_plotlyjs=True, config={"displayModeBar": False})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
        page.goto(html.resolve().as_uri())
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 1", timeout=60_000)
        page.locator(".js-plotly-plot").first.screenshot(path=str(out))
        browser.close()
    html.unlink()
    print(out)


if __name__ == "__main__":
    main("--figure" in sys.argv)
