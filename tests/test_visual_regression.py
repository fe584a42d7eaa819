"""Visual regression: every figure kind (``figure_kinds``) drawn by Debian's Chromium and compared, pixel by
pixel, with its committed baseline in ``tests/baselines/``, so that a change of style (a colour map, an axis
direction, a margin, a font) shows as a failing test rather than in a user's notebook.

Rendering: one page holding plotly.js (offline, from the installed plotly) draws each figure with
``Plotly.newPlot`` (static: no modebar, no hover) at the figure's own width and height, and the plot's element is
screenshotted at device scale 1. Inputs are synthetic and seeded, so the same code draws the same pixels.

Tolerance: a pixel differs when one of its channels differs by more than ``CHANNEL_TOLERANCE`` (of 255); a
figure fails when its size differs or more than ``MAX_DIFFERING`` of its pixels differ (anti-aliasing of text
on another build of Chromium or FreeType moves a few edge pixels; a colour map, a flipped axis, a moved title or
a new margin moves thousands). On failure the rendering and a diff image are written next to the pytest tmp dir.

Regenerate the baselines after an intended change of style::

    LENS_PLUGINS_UPDATE_BASELINES=1 python -m pytest tests/test_visual_regression.py

(then look at the new PNGs in ``git diff --stat`` / an image viewer before committing them).
"""

import io
import json
import os
from pathlib import Path

import plotly
import pytest

import figure_kinds
from test_browser import _chromium

BASELINES = Path(__file__).parent / "baselines"
CHANNEL_TOLERANCE = 40  # of 255, per channel
MAX_DIFFERING = 0.002  # share of a figure's pixels
UPDATE = os.environ.get("LENS_PLUGINS_UPDATE_BASELINES") == "1"
_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><script>{plotly}</script>
<style>body {{ margin: 0; background: white; }}</style></head><body><div id="figure"></div></body></html>"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    html = tmp_path_factory.mktemp("visual") / "page.html"
    html.write_text(_PAGE.format(plotly=plotly.offline.get_plotlyjs()), encoding="utf-8")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--font-render-hinting=none"])
        tab = browser.new_page(viewport={"width": 1600, "height": 1200}, device_scale_factor=1)
        tab.goto(html.resolve().as_uri())
        yield tab
        browser.close()


def render(page, figure) -> bytes:
    """The PNG of ``figure`` as Chromium draws it (static plot, at the figure's own size)."""
    spec = json.loads(figure.to_json())
    page.evaluate("""async ([data, layout]) => {
        const div = document.getElementById('figure');
        Plotly.purge(div);
        await Plotly.newPlot(div, data, layout, {staticPlot: true, displayModeBar: false});
    }""", [spec["data"], spec["layout"]])
    return page.locator("#figure .main-svg").first.screenshot(animations="disabled")


def compare(png: bytes, baseline: bytes) -> tuple[bool, str, object]:
    """``(same, why, diff image)``: the tolerance of this module applied to two PNGs."""
    from PIL import Image, ImageChops

    new, old = (Image.open(io.BytesIO(b)).convert("RGB") for b in (png, baseline))
    if new.size != old.size:
        return False, f"size {new.size} != baseline {old.size}", None
    diff = ImageChops.difference(new, old)
    channels = [band.point(lambda v: 255 if v > CHANNEL_TOLERANCE else 0) for band in diff.split()]
    mask = ImageChops.lighter(ImageChops.lighter(channels[0], channels[1]), channels[2])
    differing = mask.histogram()[255] / (new.size[0] * new.size[1])
    why = f"{differing:.3%} of pixels differ by more than {CHANNEL_TOLERANCE}/255 (tolerance {MAX_DIFFERING:.1%})"
    return differing <= MAX_DIFFERING, why, mask


FIGURES = figure_kinds.figures()


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_matches_its_baseline(page, name, tmp_path):
    png = render(page, FIGURES[name])
    path = BASELINES / f"{name}.png"
    if UPDATE:
        BASELINES.mkdir(exist_ok=True)
        path.write_bytes(png)
        return
    assert path.exists(), f"no baseline {path}: run LENS_PLUGINS_UPDATE_BASELINES=1 pytest {__file__}"
    same, why, mask = compare(png, path.read_bytes())
    if not same:
        (tmp_path / f"{name}.png").write_bytes(png)
        if mask is not None:
            mask.save(tmp_path / f"{name}.diff.png")
    assert same, f"{name}: {why}; rendering and diff in {tmp_path}; if the change is intended, regenerate the baselines"


def test_every_figure_kind_has_a_baseline_and_no_baseline_is_stale():
    assert sorted(p.stem for p in BASELINES.glob("*.png")) == sorted(FIGURES)


def test_a_changed_style_fails_the_comparison(page, monkeypatch):
    """The comparison sees a style change: the heatmap drawn with another sequential map, with its layer axis
    reversed, or with a thinner top margin each fail against the committed baseline, while a redraw passes."""
    from lens_plugins.plot import style

    baseline = (BASELINES / "heatmap_prob.png").read_bytes()
    assert compare(render(page, figure_kinds.figures()["heatmap_prob"]), baseline)[0]  # a redraw: the same
    monkeypatch.setattr(style, "SEQUENTIAL", "Viridis")
    same, why, _ = compare(render(page, figure_kinds.figures()["heatmap_prob"]), baseline)
    assert not same, why
    monkeypatch.undo()
    flipped = figure_kinds.figures()["heatmap_prob"]
    flipped.update_yaxes(autorange="reversed")
    assert not compare(render(page, flipped), baseline)[0]
    moved = figure_kinds.figures()["heatmap_prob"]
    moved.update_layout(title_pad_t=4)
    assert not compare(render(page, moved), baseline)[0]


def test_the_tolerance_itself():
    """A few pixels off by a little pass; one pixel-row of a colour change across a figure fails."""
    from PIL import Image

    def png(image):
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()

    base = Image.new("RGB", (200, 100), (240, 240, 255))
    near = base.copy()
    for x in range(20):
        near.putpixel((x, 5), (240 - CHANNEL_TOLERANCE, 240, 255))  # exactly at the tolerance: the same
        near.putpixel((x, 6), (0, 0, 0))  # 20 of 20,000 pixels: 0.1%, under the share
    assert compare(png(near), png(base))[0]
    far = base.copy()
    for x in range(200):
        far.putpixel((x, 50), (8, 48, 107))  # 1% of the pixels: over the share
    assert not compare(png(far), png(base))[0]
    assert compare(png(base.resize((201, 100))), png(base))[1].startswith("size")
