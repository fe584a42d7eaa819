"""The explorable lens view: its data against the result it shows, the notebook widget's state, and the exported
page driven in Debian's Chromium (as the report's browser tests): a click on a cell lists that cell's top-k, a
click on a token pins it and draws its trajectory where the data puts it, the tracked tokens are drawn by
default, dark mode, the saved JSON equals the Python side's, and the report carries the same view."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from synthetic_results import lens_result
from test_browser import browser  # noqa: F401 - the fixture: the system's Chromium through Playwright

import lens_plugins as lp
from lens_plugins.methods.report import write_report
from lens_plugins.plot.widget import ESM, LensWidget, view_data, view_json, write_widget
from lens_plugins.tokens import visible_text

PROMPT = "The Eiffel Tower is in the city of"
# The chart's geometry, read from widget.js itself
CHART = {k: int(v) for k, v in re.findall(r"(\w+): (\d+)", re.search(r"const CHART = \{([^}]*)\}", ESM.read_text()).group(1))}


@pytest.fixture(scope="module")
def res(smollm2_bridge):
    return lp.transformer_lens.run_logit_lens(smollm2_bridge, PROMPT, top_k=5, targets=[" Paris"], auto_tokens=3)


def test_view_data_is_the_results_numbers(res):
    data = view_data(res)
    n_rows, n_pos = len(res.labels), len(res.positions)
    assert len(data["top"]) == n_rows and len(data["top"][0]) == n_pos and len(data["top"][0][0]) == 5
    r, p = 12, 3
    assert [i for i, _ in data["top"][r][p]] == res.top_ids[r, 0, p].tolist()
    assert [pr for _, pr in data["top"][r][p]] == pytest.approx(res.top_probs[r, 0, p].tolist(), abs=1e-6)
    for token in res.tracked(res.positions[p]):  # tracked tokens: every row, as LensResult.tracked gives them
        track = data["tracks"][p][str(token["id"])]
        assert track["probs"] == pytest.approx(token["probs"], abs=1e-6) and not track["partial"]
        assert track["reason"] == token["reason"]
    assert data["pins"][p] == [t["id"] for t in res.tracked(res.positions[p])]
    paris = data["tracks"][p][str(res.target_ids[0].item())]
    assert paris["probs"] == pytest.approx(res.target_logprobs[:, 0, p, 0].exp().tolist(), abs=1e-6)
    # any other top-k token: its probability at the rows where it was in the top-k, None elsewhere
    other = next(i for i, _ in data["top"][r][p] if not data["tracks"][p][str(i)]["reason"])
    partial = data["tracks"][p][str(other)]
    assert partial["partial"] and partial["probs"][r] == pytest.approx(dict(data["top"][r][p])[other])
    for row, prob in enumerate(partial["probs"]):
        assert (prob is None) == (other not in res.top_ids[row, 0, p].tolist())


def test_the_notebook_widget_holds_the_view(res, tmp_path):
    widget = LensWidget(res, theme="dark")
    assert widget.theme == "dark" and widget.selected == [len(res.labels) - 1, len(res.positions) - 1]
    assert widget.data == json.loads(json.dumps(view_data(res)))  # what syncs to the front end is plain JSON
    assert "function render" in widget._esm if isinstance(widget._esm, str) else widget._esm.read_text()
    widget.selected, widget.pinned = [5, 2], [res.top_ids[5, 0, 2, 4].item()]
    saved = json.loads(widget.save_json(tmp_path / "view.json").read_text())
    assert saved["selected"] == {"row": res.labels[5], "position": res.positions[2]}
    assert [t["id"] for t in saved["trajectories"]][-1] == widget.pinned[0]
    with pytest.raises(lp.LensError, match="theme must be"):
        LensWidget(res, theme="blue")


def _points(chromium, path, actions):
    """Open ``path``, run ``actions(page)``, and return what it returns."""
    page = chromium.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(path.resolve().as_uri())
    page.wait_for_selector("td.cell")
    out = actions(page)
    page.close()
    assert errors == []
    return out


def _expected_points(probs):
    """The chart's screen coordinates of a trajectory (the geometry ``widget.js`` draws with)."""
    g = CHART
    w, h = g["width"] - g["left"] - g["right"], g["height"] - g["top"] - g["bottom"]
    step = w / (len(probs) - 1)
    return [(g["left"] + r * step, g["top"] + (1 - p) * h) for r, p in enumerate(probs) if p is not None]


def _same(drawn, expected):
    """Drawn points equal the expected ones to 0.01 px (the page writes two decimals)."""
    return len(drawn) == len(expected) and np.allclose(np.array(drawn), np.array(expected), atol=0.01, rtol=0)


def _drawn(page, token_id):
    lines = page.locator(f'g.trajectory[data-id="{token_id}"] polyline')
    points = []
    for i in range(lines.count()):
        points += [tuple(float(v) for v in pair.split(",")) for pair in lines.nth(i).get_attribute("points").split()]
    return points


def test_click_a_cell_pin_a_token_and_see_its_trajectory(browser, res, tmp_path):  # noqa: F811
    path = write_widget(tmp_path / "view.html", res)
    html = path.read_text()
    assert not re.search(r"<script[^>]+src=", html) and "https://" not in html  # offline: nothing fetched
    data = view_data(res)
    r, p = 12, 3
    pin = next(i for i, _ in data["top"][r][p] if i not in data["pins"][p])

    def actions(page):
        page.click(f'td.cell[data-row="{r}"][data-pos="{p}"]')
        heading = page.inner_text(".top-heading")
        listed = page.locator("ol.topk li .tok").all_text_contents()
        tracked = {i: _drawn(page, i) for i in data["pins"][p]}
        page.click(f'ol.topk li[data-id="{pin}"]')
        pinned = _drawn(page, pin)
        page.click("button.theme")
        dark = page.evaluate("getComputedStyle(document.querySelector('.lens-widget')).backgroundColor")
        with page.expect_download() as download:
            page.click("button.save")
        saved = json.loads(Path(download.value.path()).read_text())
        return heading, listed, tracked, pinned, dark, saved

    heading, listed, tracked, pinned, dark, saved = _points(browser, path, actions)
    assert f"at {res.labels[r]}, position {res.positions[p]}" in heading
    assert listed == [visible_text(res.token(i)) for i in res.top_ids[r, 0, p].tolist()]
    for token_id, points in tracked.items():  # the tracked tokens, drawn by default over every row
        assert _same(points, _expected_points(data["tracks"][p][str(token_id)]["probs"]))
        assert len(points) == len(res.labels)
    expected = _expected_points(data["tracks"][p][str(pin)]["probs"])
    assert _same(pinned, expected) and len(pinned) >= 1
    assert dark == "rgb(30, 30, 30)"
    assert saved == view_json(data, [r, p], [pin], "dark")


def test_the_report_carries_the_same_view(browser, tmp_path):  # noqa: F811
    lens = lens_result()  # hostile token strings: the view shows them as text
    path = write_report(tmp_path / "report.html", lens, title="report")

    def actions(page):
        page.click('td.cell[data-row="2"][data-pos="1"]')
        return page.inner_text(".top-heading"), page.locator("ol.topk li").count()

    heading, count = _points(browser, path, actions)
    assert f"at {lens.labels[2]}, position {lens.positions[1]}" in heading and count == lens.top_ids.shape[-1]
    assert 'id="explore"' not in write_report(tmp_path / "plain.html", lens, explore=False).read_text()
