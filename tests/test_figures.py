"""Each figure shows exactly its result's numbers, and token text stays text. No model: results are built
from random logits over hostile token strings (``synthetic_results``)."""

import html
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from lens_plugins import plot
from lens_plugins.methods.attribution import Attribution
from lens_plugins.plot import (
    agreement_cells, display_token, heatmap_values, lens_comparison_figure, lens_heatmap, logit_diff_trajectory,
    metric_trajectory, outlined_cells, row_selection, top_axis_labels, trajectory_figure, visible_text,
)
from lens_plugins.plot.attribution import attribution_bars
from synthetic_results import HOSTILE, lens_result


@pytest.fixture(scope="module")
def result():
    return lens_result()


def test_row_stride_keeps_the_final_row():
    assert row_selection(7, 1) == list(range(7))
    assert row_selection(7, 3) == [0, 3, 6]
    assert row_selection(8, 3) == [0, 3, 6, 7]
    with pytest.raises(ValueError, match="layer_stride must be at least 1"):
        row_selection(5, 0)


@pytest.mark.parametrize("metric", ["prob", "entropy", "kl_final_row", "final_top1_logprob", "next_token_logprob", "logprob[ Paris]"])
@pytest.mark.parametrize("stride, window", [(1, None), (2, slice(-3, None)), (4, [0, 2, -1])])
def test_heatmap_z_is_the_metric_in_every_facet(result, metric, stride, window):
    fig = lens_heatmap(result, metric, batch=[0, 1], layer_stride=stride, positions=window)
    rows = row_selection(len(result.labels), stride)
    cols = plot.position_selection(result, window)
    values = plot.metric_values(result, metric)
    for facet, b in enumerate([0, 1]):
        expected = values[rows][:, b][:, cols].numpy()
        np.testing.assert_array_equal(np.array(heatmap_values(fig, facet), dtype=np.float32), expected)
    heat = [t for t in fig.data if t.type == "heatmap"][0]
    labels = list(fig.layout.yaxis.ticktext)
    assert labels == [result.labels[r] for r in rows] and labels[-1] == result.labels[-1]
    assert heat.coloraxis == "coloraxis" and [t for t in fig.data if t.type == "heatmap"][1].coloraxis == "coloraxis"


@pytest.mark.parametrize("metric", ["final_top1_rank", "next_token_rank", "rank[ Paris]"])
def test_rank_colours_are_log10_and_blank_without_a_rank(result, metric):
    values = plot.metric_values(result, metric)[:, 0].double().numpy()
    z = np.array(heatmap_values(lens_heatmap(result, metric)), dtype=float)
    np.testing.assert_allclose(z, np.where(values >= 1, np.log10(np.maximum(values, 1)), np.nan), rtol=1e-6, equal_nan=True)
    if metric == "next_token_rank":
        assert np.isnan(z[:, -1]).all() and not np.isnan(z[:, :-1]).any()


@pytest.mark.parametrize("stride, window", [(1, None), (3, slice(2, 6))])
def test_outlines_are_exactly_the_cells_agreeing_with_the_final_top1(result, stride, window):
    fig = lens_heatmap(result, batch=[0, 1], layer_stride=stride, positions=window)
    rows = row_selection(len(result.labels), stride)
    cols = plot.position_selection(result, window)
    agree = result.top_ids[..., 0] == result.top_ids[-1:, ..., 0]  # independent of top1_agreement()
    for facet, b in enumerate([0, 1]):
        expected = {(i, j) for i, r in enumerate(rows) for j, p in enumerate(cols) if agree[r, b, p]}
        assert outlined_cells(fig, facet) == expected
        assert set(agreement_cells(result, b, rows, cols)) == expected
        assert {(len(rows) - 1, j) for j in range(len(cols))} <= expected  # the final row agrees with itself
    assert len(expected) < len(rows) * len(cols)  # and some cells do not


def test_top_axis_marks_where_the_final_top1_is_the_next_token(result):
    labels = top_axis_labels(result, 0, list(range(len(result.positions))))
    tokens = result.token_ids[0].tolist()
    marked = 0
    for p, label in enumerate(labels):
        if p == len(tokens) - 1:
            assert label == "(end)"
            continue
        right = int(result.final_top1[0, p]) == tokens[p + 1]
        assert ("●" in label) == right and display_token(result.token(tokens[p + 1])) in label
        marked += right
    assert 0 < marked < len(labels) - 1
    fig = lens_heatmap(result)
    top = [v for k, v in fig.layout.to_plotly_json().items() if k.startswith("xaxis") and v.get("side") == "top"]
    assert len(top) == 1 and list(top[0]["ticktext"]) == labels and top[0]["overlaying"] == "x"


def test_hover_names_the_top_k(result):
    hover = [t for t in lens_heatmap(result, "entropy").data if t.type == "heatmap"][0].customdata[-1][-1]
    for token, prob in result.top_tokens(-1)[result.labels[-1]]:
        assert f"{display_token(token)}  {prob:.3f}" in hover
    assert f"entropy: {result.entropy[-1, 0, -1].item():.3g}" in hover


@pytest.mark.parametrize("kind", ["prob", "rank", "logprob"])
def test_trajectory_points_are_rank_of_and_set_prob(result, kind):
    fig = trajectory_figure(result, kind=kind, batch=0, pos=3)
    by_name = {t.name: np.array(t.y, dtype=float) for t in fig.data}
    p = result.pos_index(3)
    for name in result.target_names:
        expected = {"prob": result.logprob_of(name).exp(), "rank": result.rank_of(name).float(),
                    "logprob": result.logprob_of(name)}[kind][:, 0, p].numpy()
        np.testing.assert_array_equal(by_name[display_token(name)], expected)
    for name in result.set_names:
        expected = {"prob": result.set_prob(name), "rank": result.set_rank(name).float(),
                    "logprob": result.set_logprobs[..., result.set_names.index(name)]}[kind][:, 0, p].numpy()
        np.testing.assert_array_equal(by_name[f"set {name}"], expected)
    assert list(fig.data[0].x) == result.labels


def test_several_prompts_draw_a_line_each_by_default(result):
    fig = trajectory_figure(result, targets=[" Paris"], sets=[], kind="prob")
    values = result.logprob_of(" Paris").exp()[:, :, -1]
    assert [t.name for t in fig.data] == ["·Paris · prompt 0", "·Paris · prompt 1"]
    for b, trace in enumerate(fig.data):
        np.testing.assert_array_equal(np.array(trace.y, dtype=np.float32), values[:, b].numpy())
    assert fig.data[0].line.dash != fig.data[1].line.dash and "mean" not in fig.layout.title.text


def test_several_prompts_make_a_band_of_mean_min_and_max_on_request(result):
    fig = trajectory_figure(result, targets=[" Paris"], sets=[], kind="prob", band=True)
    high, low, mean = fig.data
    values = result.logprob_of(" Paris").exp()[:, :, -1]
    np.testing.assert_allclose(mean.y, values.mean(1).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(np.array(low.y, dtype=np.float32), values.min(1).values.numpy())
    np.testing.assert_array_equal(np.array(high.y, dtype=np.float32), values.max(1).values.numpy())
    assert low.fill == "tonexty" and "mean of 2" in mean.name


def test_metric_trajectory_and_logit_diff(result):
    fig = metric_trajectory(result, ["entropy", "final_top1_rank"], pos=-2)
    np.testing.assert_array_equal(np.array(fig.data[0].y, dtype=np.float32), result.entropy[:, 0, -2].numpy())
    np.testing.assert_array_equal(fig.data[1].y, result.final_top1_rank[:, 0, -2].float().numpy())
    assert fig.layout.yaxis2.type == "log"
    from lens_plugins.methods.attribution import LogitDiff

    diff = LogitDiff(result.labels, result.positions, result.log_partition - 1.0, ["a"], ["b"])
    fig = logit_diff_trajectory(diff, pos=-1, batch=[1])
    np.testing.assert_array_equal(np.array(fig.data[0].y, dtype=np.float32), diff.values[:, 1, -1].numpy())
    with pytest.raises(IndexError, match="position 99 was not decoded"):
        logit_diff_trajectory(diff, pos=99)


def test_trajectory_needs_something_to_trace(result):
    import dataclasses

    bare = dataclasses.replace(result, target_names=[], target_ids=torch.zeros(0, dtype=torch.long),
                               target_logprobs=result.target_logprobs[..., :0], target_ranks=result.target_ranks[..., :0],
                               set_names=[], set_members=[], set_logprobs=result.set_logprobs[..., :0], set_ranks=result.set_ranks[..., :0])
    with pytest.raises(ValueError, match="compute the lens with targets"):
        trajectory_figure(bare)


def test_lens_comparison_takes_evaluate_lenses_frame():
    rows = ["embed", "1_pre", "2_pre", "2_post"]
    frame = pd.DataFrame([
        {"lens": lens, "row": row, "kl": kl, "cross_entropy": kl + 2.0, "perplexity": math.exp(kl + 2.0)}
        for lens, scale in (("logit", 1.0), ("tuned", 0.25)) for row, kl in zip(rows, [scale * v for v in (5.0, 3.0, 1.0, 0.0)])
    ]).sample(frac=1.0, random_state=0)  # order of rows must come from the row column, not the frame order
    frame = frame.sort_values(["lens"], kind="stable")
    fig = lens_comparison_figure(frame, metrics=("kl", "cross_entropy"))
    for trace in fig.data:
        part = frame[frame["lens"] == trace.name].set_index("row")
        metric = "kl" if trace.xaxis == "x" else "cross_entropy"
        assert list(trace.x) == list(dict.fromkeys(frame["row"]))
        np.testing.assert_array_equal(trace.y, part.loc[list(trace.x), metric].to_numpy())
    assert {t.name for t in fig.data} == {"logit", "tuned"} and len(fig.data) == 4
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['cross_entropy'\]"):
        lens_comparison_figure(frame.drop(columns=["cross_entropy"]))


def _attribution() -> Attribution:
    g = torch.Generator().manual_seed(3)
    heads, mlp = torch.randn(1, 3, 4, generator=g), torch.randn(1, 3, generator=g)
    bias, embed, constant = torch.randn(1, 3, generator=g), torch.randn(1, generator=g), torch.randn(1, generator=g)
    attn = heads.sum(-1) + bias
    explained = embed + attn.sum(-1) + mlp.sum(-1) + constant
    return Attribution(by="component", position=-1, target_names=["<script>"], distractor_names=[" x"],
                       member_ids=torch.tensor([1, 2]), member_weights=torch.ones(1, 2), embed=embed, pos_embed=None,
                       heads=heads, head_bias=bias, attn=attn, mlp=mlp, constant=constant, explained=explained,
                       model_value=explained, reconstruction_error=torch.zeros(1))


@pytest.mark.parametrize("by", ["component", "head"])
def test_attribution_waterfall_adds_up_to_the_explained_logit(by):
    dla = _attribution().view(by)
    fig = attribution_bars(dla, n=4)
    bars = fig.data[0]
    top = dla.top(len(dla.labels))
    by_size = sorted(top, key=lambda item: -abs(item[1]))[:4]
    assert list(bars.x[:4]) == [label for label, _ in by_size]
    np.testing.assert_allclose(bars.y[:4], [v for _, v in by_size], rtol=1e-6)
    assert bars.measure[-1] == "total" and bars.x[-1] == "sum"
    np.testing.assert_allclose(sum(bars.y[:-1]), float(dla.explained[0]), atol=1e-5)
    assert fig.layout.shapes[0].y0 == pytest.approx(float(dla.explained[0]))
    assert "&lt;script&gt;" in fig.layout.title.text


def test_whitespace_markers_and_escaping():
    assert visible_text(" Paris\n\tx\r") == "·Paris¶→x←"
    assert visible_text("\x00a\u200b") == "\\x00a\\u200b"
    assert display_token("<script>") == "&lt;script&gt;" and display_token("&amp;") == "&amp;amp;"
    assert visible_text("שלום") == "\u2068שלום\u2069"  # isolated, so "[3]" after it stays on its side


def test_hostile_tokens_stay_text_in_the_figure_json(result):
    fig = lens_heatmap(result)
    payload = fig.to_json()
    assert "<script>" not in payload and "</script>" not in payload  # plotly.io escapes '<' too
    text = json.loads(payload)
    ticks = [t for t in text["layout"]["xaxis"]["ticktext"]]
    for p, token in enumerate(result.str_tokens(0)):
        assert ticks[p] == f"{html.escape(visible_text(token), quote=False)} [{p}]"
    assert not any("\n" in t for t in ticks)


def test_bad_window_and_batch(result):
    with pytest.raises(ValueError, match="selects none of the 8 decoded positions"):
        lens_heatmap(result, positions=slice(20, None))
    with pytest.raises(IndexError, match="batch 2 is out of range"):
        lens_heatmap(result, batch=[0, 2])
    with pytest.raises(ValueError, match="unknown metric"):
        lens_heatmap(result, "nope")
