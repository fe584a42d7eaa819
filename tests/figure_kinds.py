"""Every kind of figure ``lens_plugins.plot`` draws, on deterministic synthetic results (no model): what the
style tests (``test_figure_style.py``) inspect and the visual regression test (``test_visual_regression.py``)
renders and compares with ``tests/baselines/``.

Token strings here are plain words with a leading space or a newline (the glyph convention shows) but no
right-to-left text or lone bytes, whose rendering depends on the fonts installed; ``test_browser.py`` covers
those. Each figure gets a fixed size so a baseline does not depend on the window."""

import dataclasses
import math

import pandas as pd
import torch

from lens_plugins.core import track
from lens_plugins.methods.attribution import Attribution, LogitDiff
from lens_plugins.methods.early_exit import early_exit
from lens_plugins.methods.surfaced import surfaced
from lens_plugins.plot import (
    attribution_bars, attribution_figure, early_exit_figure, head_view, lens_comparison_figure, lens_heatmap,
    logit_diff_figure, logit_diff_trajectory, metric_trajectory, model_view, sink_figure, surfaced_figure,
    tracked_figure, trajectory_figure,
)
from synthetic_results import attention_result, lens_result

WORDS = [" Paris", " London", " Rome", "The", " capital", " of", " France", " is", "\n", " the", " city", " a",
         " and", " in", " Berlin", " Madrid"]

# Figures whose y axis is not a layer axis: the head view's rows are queries, read top to bottom as a matrix.
NOT_LAYER_AXES = {"head_view"}


def lens():
    """A 7-row, 2-prompt, 8-position lens whose embedding row's KL is ~110 nats, as on SmolLM2."""
    result = lens_result(strings=WORDS, seed=1)
    kl = result.kl_final_row.clone()
    kl[0] = 100.0 + 10.0 * torch.rand(kl[0].shape, generator=torch.Generator().manual_seed(2))
    result = dataclasses.replace(result, kl_final_row=kl)
    rows, batch, seq = result.top_ids.shape[:3]
    n = 3
    logp = result.top_logprobs[..., :n].clone()  # the top-3 of every row stand in for the tracked tokens
    return dataclasses.replace(
        result, auto_ids=result.top_ids[-1, :, :, :n].clone(), auto_logprobs=logp,
        auto_reasons=torch.tensor([track.FINAL_TOP1, track.PEAKED, track.FADED]).expand(batch, seq, n).clone(),
        auto_peak_rows=torch.tensor([-1, 2, 3]).expand(batch, seq, n).clone(),
        auto_scores=torch.zeros(batch, seq, n),
    )


def attribution() -> Attribution:
    g = torch.Generator().manual_seed(3)
    heads, mlp = torch.randn(1, 4, 4, generator=g), torch.randn(1, 4, generator=g)
    bias, embed, constant = torch.randn(1, 4, generator=g) * 0.1, torch.randn(1, generator=g), torch.randn(1, generator=g)
    attn = heads.sum(-1) + bias
    explained = embed + attn.sum(-1) + mlp.sum(-1) + constant
    return Attribution(by="component", position=-1, target_names=[" Paris"], distractor_names=[" London"],
                       member_ids=torch.tensor([0, 1]), member_weights=torch.ones(1, 2), embed=embed, pos_embed=None,
                       heads=heads, head_bias=bias, attn=attn, mlp=mlp, constant=constant, explained=explained,
                       model_value=explained, reconstruction_error=torch.zeros(1))


def comparison_frame(labels):
    return pd.DataFrame([{"lens": name, "row": row, "kl": kl, "cross_entropy": kl + 1, "perplexity": math.exp(kl + 1)}
                         for name, scale in (("logit lens", 1.0), ("tuned lens", 0.3))
                         for row, kl in zip(labels, [scale * (6 - i) for i in range(len(labels))])])


def figures() -> dict:
    """name -> plotly figure, one per kind (and per colour mode of the heatmap)."""
    res, heads, dla = lens(), attention_result(strings=WORDS), attribution()
    tokens = res.str_tokens(0)
    diff = LogitDiff(res.labels, res.positions, res.log_partition - res.log_partition.mean(), [" Paris"], [" London"])
    made = {
        "heatmap_prob": lens_heatmap(res, "prob"),
        "heatmap_kl": lens_heatmap(res, "kl_final_row"),
        "heatmap_rank_facets": lens_heatmap(res, "final_top1_rank", batch=[0, 1], positions=slice(-4, None)),
        "trajectory_prob": trajectory_figure(res, kind="prob"),
        "trajectory_rank": trajectory_figure(res, kind="rank", batch=0),
        "trajectory_band": trajectory_figure(res, targets=[" Paris"], sets=[], kind="prob", band=True),
        "tracked": tracked_figure(res, "prob"),
        "metric_trajectory": metric_trajectory(res, ["entropy", "final_top1_rank"]),
        "logit_diff_trajectory": logit_diff_trajectory(diff),
        "comparison": lens_comparison_figure(comparison_frame(res.labels)),
        "waterfall": attribution_bars(dla, n=5, tokens=tokens),
        "attribution_bars": attribution_figure(dla, tokens=tokens),
        "head_grid": attribution_figure(dla.view("head"), tokens=tokens),
        "logit_diff_heatmap": logit_diff_figure(diff, tokens=tokens),
        "head_view": head_view(heads, 1, 2),
        "model_view": model_view(heads),
        "sinks": sink_figure(heads),
        "surfaced": surfaced_figure(surfaced(res, " Paris")),
        "early_exit": early_exit_figure(early_exit(res)),
    }
    for figure in made.values():  # a fixed size: the baseline must not depend on the window
        figure.update_layout(width=figure.layout.width or 800, height=figure.layout.height or 500)
    return made
