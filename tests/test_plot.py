"""The heatmap shows exactly the result's numbers, labelled with the result's rows and tokens."""

import re

import numpy as np
import pytest

from lens_plugins.plot import MAX_TEXT_POSITIONS, display_token, html_report, lens_heatmap

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def result(smollm2_bridge):
    import lens_plugins as lp

    return lp.transformer_lens.run_logit_lens(smollm2_bridge, PROMPT, top_k=5, targets=[" Paris"], prepend_bos=True)


def z_of(fig) -> np.ndarray:
    return np.array(fig.data[0].z, dtype=float)


@pytest.mark.parametrize("metric", ["prob", "logprob", "entropy", "kl_final_row", "kl_row_final", "next_token_logprob"])
def test_z_is_the_metric(result, metric):
    expected = result.metric(metric)[:, 0].numpy()
    np.testing.assert_allclose(z_of(lens_heatmap(result, metric)), expected, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("metric", ["final_top1_rank", "next_token_rank", "rank[ Paris]"])
def test_ranks_are_on_a_log_scale(result, metric):
    rank = (result.rank_of(" Paris") if metric == "rank[ Paris]" else getattr(result, metric))[:, 0].double().numpy()
    fig = lens_heatmap(result, metric)
    expected = np.where(rank >= 1, np.log10(np.maximum(rank, 1)), np.nan)
    np.testing.assert_allclose(z_of(fig), expected, rtol=1e-6, equal_nan=True)
    ticktext = fig.layout.coloraxis.colorbar.ticktext  # one colour bar shared by the facets
    assert ticktext[0] == "1" and ticktext[1] == "10"  # the colour bar reads in ranks, not log10
    assert 10 ** (len(ticktext) - 1) >= np.nanmax(rank[rank >= 1])


def test_next_token_rank_is_blank_at_the_last_position(result):
    z = z_of(lens_heatmap(result, "next_token_rank"))
    assert np.isnan(z[:, -1]).all() and not np.isnan(z[:, :-1]).any()


def test_axes_and_cell_text(result):
    fig = lens_heatmap(result)
    heatmap = fig.data[0]
    assert list(heatmap.y) == list(range(len(result.labels))) and list(fig.layout.yaxis.tickvals) == list(heatmap.y)
    assert list(fig.layout.yaxis.ticktext) == result.labels and fig.layout.yaxis.range[0] < 0  # embed at the bottom
    assert list(fig.layout.xaxis.ticktext) == ["&lt;|im_start|&gt; [0]", "The [1]", "·capital [2]", "·of [3]", "·France [4]", "·is [5]"]
    top = fig.layout.xaxis2
    assert top.side == "top" and top.overlaying == "x"
    assert list(top.ticktext)[:2] == ["The", "·capital"] and top.ticktext[-1] == "(end)"
    assert heatmap.text[-1][-1] == "·Paris"  # final row, last position
    assert heatmap.texttemplate == "%{text}"


def test_hover_lists_top_k_with_probabilities(result):
    hover = lens_heatmap(result, "entropy").data[0].customdata[-1][-1]
    top = result.top_tokens(-1)["29_post"]
    for token, prob in top:
        assert f"{display_token(token)}  {prob:.3f}" in hover  # the one glyph convention, not a repr
    assert f"entropy: {result.entropy[-1, 0, -1].item():.3g}" in hover
    assert "(end of prompt)" in hover


def test_bad_metric_and_batch_name_the_choices(result):
    with pytest.raises(ValueError, match=r"unknown metric 'probability'.*'kl_final_row'.*'rank\[ Paris\]'"):
        lens_heatmap(result, "probability")
    with pytest.raises(ValueError, match=r"unknown metric 'rank\[ London\]'"):
        lens_heatmap(result, "rank[ London]")
    with pytest.raises(IndexError, match="batch 1 is out of range: this result holds 1 prompt"):
        lens_heatmap(result, batch=1)


def test_many_positions_drop_cell_text_but_render(smollm2_bridge):
    import lens_plugins as lp

    long = lp.transformer_lens.run_logit_lens(smollm2_bridge, " one two" * 40, top_k=1, layers=[0, 15])
    assert len(long.positions) > MAX_TEXT_POSITIONS
    fig = lens_heatmap(long)
    assert fig.data[0].texttemplate is None
    assert z_of(fig).shape == (3, len(long.positions))
    assert list(fig.data[0].x) == list(range(len(long.positions)))  # repeated tokens still get their own column
    fig.to_json()  # serialises, i.e. plotly accepted every attribute


def test_html_report_is_standalone(result, tmp_path):
    path = html_report(result, tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    assert "plotly.js v" in text and not re.search(r"<script[^>]+src=", text)  # plotly.js inlined, nothing fetched
    assert text.count("Plotly.newPlot(") == 6  # 5 default metrics + rank[ Paris]
    for metric in ["prob", "entropy", "kl_final_row", "final_top1_rank", "next_token_rank", "rank[ Paris]"]:
        assert f"<h2>{metric}</h2>" in text
    assert '"ticktext":["embed","1_pre"' in text  # the figure data itself
    assert "predicts <code>·Paris</code>" in text  # the model's prediction, in the summary line, as glyphs


def test_html_report_checks_every_metric_before_writing(result, tmp_path):
    path = tmp_path / "report.html"
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        html_report(result, path, metrics=["prob", "nope"])
    assert not path.exists()


def test_png_export(result, tmp_path):
    pytest.importorskip("kaleido", reason="kaleido renders plotly figures to PNG; not installed")
    png = tmp_path / "lens.png"
    lens_heatmap(result).write_image(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
