"""One style for every figure (``lens_plugins.plot.style``), checked on the figure objects themselves: every kind
of figure (``figure_kinds``) has its layer axes upwards, colours from the two maps of the style module, custom
hovers on every trace, ``token [i]`` positions, one glyph convention and a title below the modebar. Also the
heatmap's robust colour clip for divergences, its ``zmin`` / ``zmax`` / ``log``, decade-only rank axes, token sets
drawn under their targets, and ``Attribution.top`` agreeing with the waterfall."""

import json
import math
import re

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import figure_kinds
from lens_plugins.core.errors import LensValueError
from lens_plugins.plot import attribution_bars, heatmap_values, lens_heatmap, metric_trajectory, style, trajectory_figure
from lens_plugins.plot.figures import CLIPPED_METRICS, LOG_FLOOR, robust_max

FIGURES = figure_kinds.figures()


def _scale(name: str, reverse: bool = False) -> list:
    """The explicit colour list plotly resolves a map's name to (what a figure's JSON holds)."""
    scale = [list(pair) for pair in go.Heatmap(colorscale=name).colorscale]
    return [[1 - p, c] for p, c in reversed(scale)] if reverse else scale


def _colour_users(figure) -> list[tuple[list, bool]]:
    """``(colour scale, reversed)`` of every heatmap (its own or its colour axis's)."""
    used = []
    for trace in figure.data:
        if trace.type != "heatmap":
            continue
        if trace.coloraxis:
            axis = figure.layout[trace.coloraxis]
            used.append(([list(p) for p in axis.colorscale], bool(axis.reversescale)))
        else:
            used.append(([list(p) for p in trace.colorscale], bool(trace.reversescale)))
    return used


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_every_trace_has_a_custom_hover(name):
    assert style.custom_hovers(FIGURES[name]) == []


@pytest.mark.parametrize("name", sorted(set(FIGURES) - figure_kinds.NOT_LAYER_AXES))
def test_layer_axes_run_upwards(name):
    figure = FIGURES[name]
    axes = [figure.layout[key] for key in figure.layout if key.startswith("yaxis")]
    assert axes and all(style.upwards(axis) for axis in axes)
    for axis in axes:  # where rows are labelled, the first (embedding or layer 0) is the lowest
        if axis.ticktext and axis.tickvals is not None:
            lowest = axis.ticktext[int(np.argmin(axis.tickvals))]
            assert lowest in ("embed", "L0"), lowest
    heat = [t for t in figure.data if t.type == "heatmap" and isinstance(t.y[0] if t.y is not None else None, str)]
    for trace in heat:  # categorical rows: plotly draws the first category at the bottom
        assert trace.y[0] in ("embed", "L0"), trace.y[0]


def test_the_head_view_reads_as_a_matrix_and_the_model_view_does_not():
    assert FIGURES["head_view"].layout.yaxis.autorange == "reversed"  # queries top to bottom, not layers
    mv = FIGURES["model_view"].layout.yaxis
    assert list(mv.ticktext) == ["L0", "L1", "L2"] and list(mv.tickvals) == sorted(mv.tickvals)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_heatmaps_use_the_style_modules_two_maps(name):
    sequential, diverging = _scale(style.SEQUENTIAL), _scale(style.DIVERGING)
    for scale, _ in _colour_users(FIGURES[name]):
        assert scale in (sequential, diverging), scale[:2]
    signed = {"head_grid": diverging, "logit_diff_heatmap": diverging}
    for scale, _ in _colour_users(FIGURES[name]):
        assert scale == signed.get(name, sequential)
    for trace in FIGURES[name].data:
        if trace.type == "heatmap" and name in signed:
            assert trace.zmid == 0 and trace.zmin == -trace.zmax  # symmetric about zero


def test_ranks_are_dark_at_rank_1_and_the_rest_dark_when_high():
    (scale, reverse), = set((json.dumps(s), r) for s, r in _colour_users(FIGURES["heatmap_rank_facets"]))
    assert reverse and json.loads(scale) == _scale(style.SEQUENTIAL)
    assert not _colour_users(FIGURES["heatmap_prob"])[0][1]


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_titles_clear_the_modebar(name):
    figure = FIGURES[name]
    title = figure.layout.title
    assert title.text and title.yref == "container" and title.yanchor == "top" and title.pad.t >= style.MODEBAR_PX
    lines = 1 + title.text.count("<br>")
    assert figure.layout.margin.t >= style.top_margin(lines)


def _texts(figure) -> list[str]:
    """Every string a figure shows: titles, tick labels, trace names, annotations."""
    shown = [figure.layout.title.text or ""]
    for key in figure.layout:
        if key.startswith(("xaxis", "yaxis")) and figure.layout[key].ticktext:
            shown += [str(t) for t in figure.layout[key].ticktext]
    shown += [t.name or "" for t in figure.data] + [a.text or "" for a in figure.layout.annotations]
    return shown


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_positions_are_token_and_index_and_whitespace_is_glyphs(name):
    texts = _texts(FIGURES[name])
    joined = "\n".join(texts)
    assert not re.search(r"position -?\d", joined)  # never a bare "position -1"
    for label in re.findall(r"at ([^<]*\[-?\d+\])", joined):  # "at ·is [7]" / "at token [7]"
        assert re.fullmatch(r"\S+ \[\d+\]", label), label
    assert " Paris" not in joined and "'" + " Paris" not in joined  # a leading space is '·', not ' ' or a repr
    assert not any(ch in joined for ch in "\t\r␣")


def test_heatmap_axes_label_every_position_as_token_and_index():
    res = figure_kinds.lens()
    ticks = FIGURES["heatmap_prob"].layout.xaxis.ticktext
    assert list(ticks) == [f"{style.position_label(res.str_tokens(0), p)}" for p in res.positions]
    assert ticks[0] == "·Paris [0]" and ticks[-1] == "·is [7]"
    assert style.position_label(res.str_tokens(0), -1) == "·is [7]" and style.position_label(None, -1) == "token [-1]"


def test_kl_colour_is_clipped_at_a_robust_percentile_of_the_non_embedding_rows():
    res = figure_kinds.lens()
    figure = lens_heatmap(res, "kl_final_row")
    values = res.kl_final_row[:, 0]
    expected = float(np.percentile(values[1:].double().numpy(), style.ROBUST_PERCENTILE))
    assert robust_max(values, res.labels) == pytest.approx(expected, rel=1e-9)
    axis = figure.layout.coloraxis
    assert axis.cmax == pytest.approx(expected) and axis.cmax < float(values[0].min())  # the embedding row is above
    assert axis.cmin == pytest.approx(float(values.min()))
    assert f"clipped at {expected:.3g}: the 99th percentile" in axis.colorbar.title.text
    assert "non-embedding rows" in axis.colorbar.title.text
    np.testing.assert_array_equal(np.array(heatmap_values(figure), dtype=np.float32), values.numpy())  # z is exact
    assert "kl_row_final" in CLIPPED_METRICS and "prob" not in CLIPPED_METRICS


def test_zmin_zmax_and_log():
    res = figure_kinds.lens()
    fixed = lens_heatmap(res, "kl_final_row", zmin=0.5, zmax=50.0).layout.coloraxis
    assert (fixed.cmin, fixed.cmax) == (0.5, 50.0) and "clipped" not in fixed.colorbar.title.text
    logged = lens_heatmap(res, "kl_final_row", log=True, zmax=100.0)
    z = np.array(heatmap_values(logged), dtype=float)
    np.testing.assert_allclose(z, np.log10(np.maximum(res.kl_final_row[:, 0].double().numpy(), LOG_FLOOR)), rtol=1e-6)
    axis = logged.layout.coloraxis
    assert axis.cmax == pytest.approx(2.0) and "(log scale)" in axis.colorbar.title.text
    assert list(axis.colorbar.ticktext)[-1] == "100"
    rank = lens_heatmap(res, "final_top1_rank", zmax=10).layout.coloraxis
    assert rank.cmax == pytest.approx(1.0)  # ranks are coloured by log10 already
    prob = lens_heatmap(res, "prob").layout.coloraxis
    assert (prob.cmin, prob.cmax) == (0.0, 1.0)
    with pytest.raises(LensValueError, match="log-probabilities are negative"):
        lens_heatmap(res, "logprob", log=True)
    with pytest.raises(LensValueError, match="on a log scale only"):
        lens_heatmap(res, "final_top1_rank", log=False)
    with pytest.raises(LensValueError, match="must be below"):
        lens_heatmap(res, "prob", zmin=0.6, zmax=0.2)


def test_rank_axes_are_log_with_decade_labels_only():
    res = figure_kinds.lens()
    for axis in (trajectory_figure(res, kind="rank").layout.yaxis,
                 metric_trajectory(res, ["entropy", "final_top1_rank"]).layout.yaxis2):
        assert axis.type == "log" and axis.dtick == 1  # every power of 10, no 2s and 5s between
        assert axis.range[0] < 0 < axis.range[1]  # rank 1 (10 ** 0) is on the axis, with its label
    assert metric_trajectory(res, ["entropy"]).layout.yaxis.type != "log"


def test_a_token_set_is_drawn_under_its_targets():
    res = figure_kinds.lens()
    figure = trajectory_figure(res, kind="prob", batch=0)
    sets = [i for i, t in enumerate(figure.data) if t.name.startswith("set ")]
    targets = [i for i, t in enumerate(figure.data) if not t.name.startswith("set ")]
    assert sets and targets and max(sets) < min(targets)  # later traces are drawn on top
    for i in sets:
        assert figure.data[i].line.width > max(figure.data[j].line.width for j in targets)
        assert figure.data[i].opacity < 1 and figure.data[i].mode == "lines"
    for j in targets:
        assert figure.data[j].opacity == 1 and "markers" in figure.data[j].mode
    colours = {t.name: t.line.color for t in figure.data}
    for i, name in enumerate(res.target_names + [f"set {n}" for n in res.set_names]):  # colour follows the series
        assert colours[name.replace(" ", "·") if i < len(res.target_names) else name] == style.COLOURS[i]


def test_rank_trajectories_are_per_prompt_by_default():
    res = figure_kinds.lens()
    figure = trajectory_figure(res, targets=[" Paris"], sets=[], kind="rank")
    ranks = res.rank_of(" Paris")[:, :, -1].float()
    assert len(figure.data) == 2 and "mean" not in figure.layout.title.text
    for b, trace in enumerate(figure.data):
        np.testing.assert_array_equal(np.array(trace.y, dtype=np.float32), ranks[:, b].numpy())
    banded = trajectory_figure(res, targets=[" Paris"], sets=[], kind="rank", band=True)
    assert "mean of 2 prompts" in banded.layout.title.text
    np.testing.assert_allclose(banded.data[-1].y, ranks.mean(1).numpy(), rtol=1e-6)


def test_top_is_signed_and_the_waterfall_is_top_by_magnitude():
    dla = figure_kinds.attribution()
    values = dla.values[0]
    signed = dla.top(4)
    assert [v for _, v in signed] == sorted(values.tolist(), reverse=True)[:4]
    assert [v for _, v in dla.top(4, largest=False)] == sorted(values.tolist())[:4]
    by_size = dla.top(4, largest=None)
    assert [abs(v) for _, v in by_size] == sorted(values.abs().tolist(), reverse=True)[:4]
    assert any(v < 0 for _, v in by_size)  # a negative write among the largest: the two orders differ
    bars = attribution_bars(dla, n=4).data[0]
    assert list(bars.x[:4]) == [label for label, _ in by_size]
    np.testing.assert_allclose(bars.y[:4], [v for _, v in by_size], rtol=1e-6)
    assert "by |value|" in attribution_bars(dla, n=4).layout.title.text
    assert "largest=None" in type(dla).top.__doc__ and "largest=None" in attribution_bars.__doc__


def test_model_view_hover_names_the_query_of_each_flipped_row():
    heads = figure_kinds.attention_result(strings=figure_kinds.WORDS)
    figure = FIGURES["model_view"]
    n = heads.patterns.shape[-1]
    hover = figure.data[0].customdata
    z = figure.data[0].z
    # the top row of layer 0's block (index n - 1) is query 0, whose only key is itself
    assert "[0] → " in hover[n - 1][0] and math.isclose(z[n - 1][0], 1.0, rel_tol=1e-6)
    assert torch.isclose(heads.patterns[0, 0, 0, n - 1, 0], torch.tensor(float(z[0][0])))
