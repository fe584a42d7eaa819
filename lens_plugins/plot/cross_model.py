"""Plotly view of ``CrossModelScores``: the paper's source-layer x target-layer heatmaps (Ghandeharioun et al.
2024, section 5), precision@1 of the cross-model Patchscope beside the held-out R^2 of its affine map."""

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def cross_model_figure(scores) -> go.Figure:
    """Two heatmaps, source row (y, first at the bottom) by target row (x): precision@1 and R^2 (clipped at 0
    for the colour; the hover shows the value)."""
    figure = make_subplots(rows=1, cols=2, horizontal_spacing=0.16, subplot_titles=(
        f"precision@1 vs the target's own top-1 ({scores.positions} positions)",
        f"held-out R^2 of the map ({scores.pairs_kept} pairs of {scores.tokens} tokens)"))
    for col, (values, name, bar_x) in enumerate(((scores.precision_at_1, "precision@1", 0.42),
                                                   (scores.r2, "R^2", 1.0)), start=1):
        figure.add_trace(go.Heatmap(
            z=values.clamp(min=0).tolist(), customdata=values.tolist(), x=scores.target_labels,
            y=scores.source_labels, zmin=0, zmax=1, colorscale="Viridis", colorbar={"x": bar_x, "title": name},
            hovertemplate="source %{y} -> target %{x}<br>" + name + " %{customdata:.3f}<extra></extra>"),
            row=1, col=col)
        figure.update_xaxes(title_text="target row", type="category", row=1, col=col)
        figure.update_yaxes(title_text="source row", type="category", row=1, col=col)
    figure.update_layout(width=1100, height=500, plot_bgcolor="white")
    return figure


__all__ = ["cross_model_figure"]
