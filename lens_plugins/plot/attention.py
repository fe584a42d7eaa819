"""Plotly views of an ``AttentionResult``: one head's pattern, every head at once, and attention sinks.

The model view is one heatmap, not a grid of subplots: every layer's and head's ``query x key`` block is
tiled into a single matrix with NaN gutters between blocks, so 30 layers x 9 heads is one trace that plotly
draws at once, and each block's numbers are exactly the pattern's. Layer 0 is at the bottom, as in every layer
axis of ``lens_plugins.plot`` (``plot.style``); within a block the queries still run down, in prompt order, as in
the head view.
"""

import math
from typing import Optional

import plotly.graph_objects as go
import torch

from lens_plugins.core.errors import LensValueError
from lens_plugins.methods.attention import AttentionResult
from lens_plugins.plot import style

# Refuse a model view larger than this many cells (a long prompt): the browser would stall on it.
MAX_MODEL_VIEW_CELLS = 4_000_000


def _labels(result: AttentionResult, batch: int, positions: list[int]) -> list[str]:
    tokens = result.str_tokens(batch)
    return [style.position_label(tokens, p) for p in positions]


def head_view(result: AttentionResult, layer: int, head: int, batch: int = 0) -> go.Figure:
    """Which key positions each query position of one head attends to: rows are queries (top to bottom in
    prompt order, read as a matrix: this axis is not a layer axis), columns keys; a row sums to 1."""
    pattern = result.head(layer, head, batch)
    real = [p for p in range(pattern.shape[0]) if result.attention_mask[batch, p]]
    grid = pattern[real][:, real]
    labels = _labels(result, batch, real)
    hover = [[f"{labels[q]} → {labels[k]}: {float(grid[q, k]):.3f}" for k in range(len(real))] for q in range(len(real))]
    figure = go.Figure(go.Heatmap(
        z=grid.tolist(), x=list(range(len(real))), y=list(range(len(real))), colorscale=style.SEQUENTIAL, zmin=0,
        zmax=1, colorbar={"title": {"text": "attention"}}, customdata=hover, hovertemplate="%{customdata}<extra></extra>",
    ))
    ticks = {"tickmode": "array", "tickvals": list(range(len(real))), "ticktext": labels, "showgrid": False}
    figure.update_xaxes(tickangle=-45, side="top", **ticks)
    figure.update_yaxes(title_text="query", autorange="reversed", **ticks)
    side = 260 + 34 * len(real)
    figure.update_layout(width=side + 120, height=side + 60 + 100, margin={"t": 0})
    style.finish(figure, f"layer {result.layers[result.layer_index(layer)]}, head {head % result.n_heads}: "
                         "each query (row) attends to the keys (columns)", extra_top=100)
    return figure


def model_view_grid(result: AttentionResult, batch: int = 0) -> torch.Tensor:
    """The tiled ``[layers * (n + 1) - 1, heads * (n + 1) - 1]`` matrix of the model view (NaN gutters), as
    drawn: row 0 at the bottom. Layer ``i``'s block is rows ``i * (n + 1)`` to ``i * (n + 1) + n - 1`` with its
    queries upside down (query 0 on the block's top row), so that layers go up and queries go down."""
    real = result.attention_mask[batch].nonzero().flatten()
    n, n_layers, n_heads = len(real), len(result.layers), result.n_heads
    cells = (n_layers * (n + 1)) * (n_heads * (n + 1))
    if cells > MAX_MODEL_VIEW_CELLS:
        raise LensValueError(f"a model view of {n_layers} layers x {n_heads} heads at {n} tokens has {cells:,} cells, "
                         f"more than {MAX_MODEL_VIEW_CELLS:,}: read fewer layers (layers=[...]) or a shorter prompt")
    grid = torch.full((n_layers * (n + 1) - 1, n_heads * (n + 1) - 1), math.nan)
    patterns = result.patterns[:, batch][:, :, real][:, :, :, real]
    for i in range(n_layers):
        for h in range(n_heads):
            grid[i * (n + 1): i * (n + 1) + n, h * (n + 1): h * (n + 1) + n] = patterns[i, h].flip(0)
    return grid


def model_view(result: AttentionResult, batch: int = 0, title: Optional[str] = None) -> go.Figure:
    """Every layer's (up, layer 0 at the bottom) and head's (across) attention pattern, each a small query x
    key block with its queries down and keys across."""
    grid = model_view_grid(result, batch)
    real = result.attention_mask[batch].nonzero().flatten().tolist()
    n = len(real)
    labels = _labels(result, batch, real)
    hover = []
    for row in range(grid.shape[0]):
        i, flipped = divmod(row, n + 1)
        q = n if flipped == n else n - 1 - flipped  # the block's rows run from the last query up to the first
        line = []
        for col in range(grid.shape[1]):
            h, k = divmod(col, n + 1)
            line.append("" if q == n or k == n else
                        f"layer {result.layers[i]} head {h}<br>{labels[q]} → {labels[k]}: {float(grid[row, col]):.3f}")
        hover.append(line)
    figure = go.Figure(go.Heatmap(
        z=grid.tolist(), colorscale=style.SEQUENTIAL, zmin=0, zmax=1, customdata=hover, hoverongaps=False,
        hovertemplate="%{customdata}<extra></extra>", colorbar={"title": {"text": "attention"}},
    ))
    centre = (n - 1) / 2
    figure.update_xaxes(tickmode="array", tickvals=[h * (n + 1) + centre for h in range(result.n_heads)],
                        ticktext=[f"H{h}" for h in range(result.n_heads)], side="top", showgrid=False, zeroline=False)
    figure.update_yaxes(tickmode="array", tickvals=[i * (n + 1) + centre for i in range(len(result.layers))],
                        ticktext=[f"L{layer}" for layer in result.layers], showgrid=False,
                        zeroline=False, scaleanchor="x", title_text="layer")
    block = max(24, min(72, 900 // result.n_heads))  # pixels per layer-head block
    figure.update_layout(width=200 + block * result.n_heads, height=200 + block * len(result.layers))
    style.finish(figure, title or "every layer and head",
                 "in each block, queries down and keys across;<br>layer 0 at the bottom; hover for tokens", extra_top=20)
    style.layer_axis(figure)
    return figure


def sink_figure(result: AttentionResult, batch: int = 0) -> go.Figure:
    """Per layer and head, the share of attention on the prompt's first token (``sink_score``)."""
    scores = result.sink_score()[:, batch]
    figure = go.Figure(go.Heatmap(
        z=scores.tolist(), x=[f"H{h}" for h in range(result.n_heads)], y=[f"L{layer}" for layer in result.layers],
        colorscale=style.SEQUENTIAL, zmin=0, zmax=1, colorbar={"title": {"text": "share on first token"}},
        hovertemplate="%{y} %{x}: %{z:.3f} of the attention on the first token<extra></extra>",
    ))
    figure.update_yaxes(title_text="layer")
    figure.update_xaxes(title_text="head")
    figure.update_layout(height=200 + 18 * len(result.layers), width=300 + 40 * result.n_heads)
    position = int(result.first_positions()[batch])
    style.finish(figure, "attention sink: mean share of attention on the first token",
                 "the first token: " + style.position_label(result.str_tokens(batch), position))
    style.layer_axis(figure)
    return figure

__all__ = ["MAX_MODEL_VIEW_CELLS", "head_view", "model_view_grid", "model_view", "sink_figure"]
