"""The report and every figure rendered by a real browser: Debian's headless Chromium driven by Playwright.

Playwright drives the system's ``chromium`` (``executable_path``), so nothing is downloaded; ``make browser``
installs it. Without it these tests skip, unless ``LENS_PLUGINS_REQUIRE_BROWSER=1`` (as ``make test`` sets),
where a missing browser is an error.
"""

import io
import math
import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

from lens_plugins.plot import lens_comparison_figure, lens_heatmap, trajectory_figure, visible_text, write_page
from lens_plugins.plot.attention import head_view, model_view, sink_figure
from lens_plugins.methods.report import write_report
from synthetic_results import HOSTILE, attention_result, lens_result


def _chromium() -> str:
    path = os.environ.get("LENS_PLUGINS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    required = os.environ.get("LENS_PLUGINS_REQUIRE_BROWSER") == "1"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if path is None:
        if required:
            raise FileNotFoundError("no chromium on PATH: run `make browser` (apt-get install chromium)")
        pytest.skip("no chromium on PATH (make browser installs Debian's)")
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        system = subprocess.run([executable, "--version"], capture_output=True, text=True).stdout
        assert instance.version in system  # the system's Chromium, not a downloaded one
        yield instance
        instance.close()


def render(browser, path, figures: int) -> dict:
    """Open ``path``, wait until plotly has drawn ``figures`` plots, and return what the page shows: the text
    of every SVG text element, console errors, page errors, dialogs (a script that ran) and a screenshot."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors, dialogs = [], []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(path.resolve().as_uri())
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {figures}", timeout=60_000)
    texts = page.evaluate("Array.from(document.querySelectorAll('svg text')).map(t => t.textContent)")
    plots = page.evaluate("document.querySelectorAll('.js-plotly-plot').length")
    png = page.screenshot(full_page=True)
    page.close()
    return {"texts": texts, "errors": errors, "dialogs": dialogs, "png": png, "plots": plots}


def pixel_stats(png: bytes) -> tuple[float, int]:
    """Grey-level variance and the number of distinct colours of a screenshot."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    grey = image.convert("L").histogram()
    count = sum(grey)
    mean = sum(level * n for level, n in enumerate(grey)) / count
    variance = sum(n * (level - mean) ** 2 for level, n in enumerate(grey)) / count
    colours = image.getcolors(maxcolors=1 << 20)
    return variance, len(colours) if colours is not None else 1 << 20


def check_rendered(shown: dict, figures: int) -> None:
    assert shown["errors"] == [] and shown["dialogs"] == []  # nothing failed, and no token ran as a script
    assert shown["plots"] == figures
    variance, colours = pixel_stats(shown["png"])
    assert variance > 300 and colours > 100, (variance, colours)  # a blank page: 0 and 1


def test_every_figure_renders_hostile_tokens_as_text(browser, tmp_path):
    lens, heads = lens_result(), attention_result()
    frame = pd.DataFrame([{"lens": name, "row": row, "kl": kl, "cross_entropy": kl + 1, "perplexity": math.exp(kl + 1)}
                          for name, scale in (("logit lens", 1.0), ("tuned <lens>", 0.3))
                          for row, kl in zip(lens.labels, [scale * (6 - i) for i in range(len(lens.labels))])])
    sections = [
        ("facets", lens_heatmap(lens, "entropy", batch=[0, 1], layer_stride=2, positions=slice(1, None))),
        ("ranks", lens_heatmap(lens, "final_top1_rank")),
        ("trajectory", trajectory_figure(lens, kind="rank")),
        ("comparison", lens_comparison_figure(frame)),
        ("head", head_view(heads, 1, 2)),
        ("model", model_view(heads)),
        ("sinks", sink_figure(heads)),
    ]
    path = write_page(tmp_path / "gallery.html", "<script>alert('title')</script>", "<p>intro</p>", sections)
    shown = render(browser, path, len(sections))
    check_rendered(shown, len(sections))
    text = "\n".join(shown["texts"])
    for token in HOSTILE[:8]:  # prompt 0's input tokens: the x-axis of the heatmap, in full
        assert visible_text(token) in text, token
    assert "<script>alert(1)</script> [0]" in shown["texts"]  # a tick label, verbatim
    assert any(t.startswith("\u2068שלום\u2069 [5]") for t in shown["texts"])
    assert "tuned <lens>" in text and "·Paris" in text and "line¶break" in text


def test_report_of_hostile_tokens(browser, tmp_path):
    lens, heads = lens_result(), attention_result(seq=8)
    heads.token_ids[:] = lens.token_ids
    path = write_report(tmp_path / "report.html", lens, attention=heads, title="report of <b>hostile</b> tokens")
    shown = render(browser, path, 5)
    check_rendered(shown, 5)
    assert visible_text(HOSTILE[2]) + " [2]" == "\"double\"·'single' [2]"
    assert "\"double\"·'single' [2]" in shown["texts"]


@pytest.mark.slow
def test_cli_report_on_the_default_model(browser, tmp_path, monkeypatch, capsys):
    """``lens-plugins report`` on the embedded SmolLM2, loaded as the command loads it, opened in Chromium."""
    from lens_plugins.cli import main as cli

    path = tmp_path / "report.html"
    assert cli.main(["report", "The capital of France is", "-o", str(path), "--prepend-bos"]) == 0
    assert capsys.readouterr().err.endswith(f"report written to {path}\n")
    html = path.read_text(encoding="utf-8")
    assert "plotly.js v" in html and not re.search(r"<script[^>]+src=", html)  # inlined: works offline
    shown = render(browser, path, 8)  # lens, trajectory, tokens worth tracking, attribution x 3, attention x 2
    check_rendered(shown, 8)
    texts = shown["texts"]
    for label in ["<|im_start|> [0]", "·capital [2]", "·is [5]", "29_post", "embed", "23_attn", "L29", "H8"]:
        assert label in texts, label
    assert "·Paris" in texts  # the final row's top-1 at the last position: a heatmap cell and a trajectory's name
    assert any(t.startswith("explained") for t in texts)
