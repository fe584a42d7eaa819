"""Render the README's gallery: six figures of SmolLM2-135M on "The capital of France is", as PNG files drawn by
the system's Chromium (Playwright with ``executable_path``; nothing downloaded).

    python docs/gallery.py [OUT_DIR]        # default docs/images

``tests/test_docs_gallery.py`` renders them into a scratch directory on every run and checks each image; the
committed copies in ``docs/images`` are what the README shows (rerun this script after a figure changes).
"""

import shutil
import sys
from pathlib import Path

PROMPT = "The capital of France is"
# file name -> what the README's caption says it is
GALLERY = {
    "lens_heatmap.png": "the logit lens heatmap: each row's top-1 and P(top-1), embeddings at the bottom",
    "rank_trajectory.png": "the rank of ' Paris' and ' London' at every row",
    "attribution_waterfall.png": "direct logit attribution of ' Paris' vs ' London': the top components",
    "attribution_heads.png": "the same attribution for every head (layer x head)",
    "logit_diff.png": "the logit difference ' Paris' - ' London' after every sublayer",
    "attention_sinks.png": "the attention sink of every head: the share of attention on the first token",
}


def figures() -> dict:
    """The gallery's plotly figures, computed on the default model."""
    import lens_plugins as lp
    from lens_plugins import plot
    from lens_plugins.plot.attention import sink_figure
    from lens_plugins.plot.attribution import attribution_bars, attribution_figure

    model = lp.load_default_model(backend="transformer_lens")
    names = list(dict.fromkeys(lp.transformer_lens.hook_filter(model, sublayers=True, attribution=True)
                               + lp.transformer_lens.attention_hook_filter(model)))
    _, cache = model.run_with_cache(PROMPT, names_filter=names)
    res = cache.lens.logit_lens(targets=[" Paris", " London"])
    sub = lp.transformer_lens.logit_diff(cache, " Paris", " London", sublayers=True)
    return {
        "lens_heatmap.png": plot.lens_heatmap(res, "prob", layer_stride=2),
        "rank_trajectory.png": plot.trajectory_figure(res, kind="rank"),
        "attribution_waterfall.png": attribution_bars(cache.lens.attribution(" Paris", " London"), n=10),
        "attribution_heads.png": attribution_figure(cache.lens.attribution(" Paris", " London", by="head")),
        "logit_diff.png": plot.logit_diff_trajectory(sub),
        "attention_sinks.png": sink_figure(lp.transformer_lens.attention(cache, model.to_tokens(PROMPT))),
    }


def render(out: Path, executable: str = "") -> list[Path]:
    """Write every gallery PNG into ``out`` and return their paths."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    executable = executable or shutil.which("chromium") or shutil.which("chromium-browser") or ""
    if not executable:
        raise FileNotFoundError("no chromium on PATH: run `make browser` (apt-get install chromium)")
    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        for name, figure in figures().items():
            html = out / (name + ".html")
            figure.write_html(html, include_plotlyjs=True, config={"displayModeBar": False})
            page = browser.new_page(viewport={"width": 1100, "height": 800}, device_scale_factor=1)
            page.goto(html.resolve().as_uri())
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 1", timeout=60_000)
            page.locator(".js-plotly-plot").first.screenshot(path=str(out / name))
            page.close()
            html.unlink()
            written.append(out / name)
        browser.close()
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "images"
    for path in render(target):
        print(path)
