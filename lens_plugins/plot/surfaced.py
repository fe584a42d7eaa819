"""Plotly view of a ``SurfacedResult``: per row, how many targets surfaced (first became top-1) and how many
were overridden there, beside the outcome counts over the whole dataset.

Counts come from ``SurfacedResult.row_counts`` and ``summary``, so what the figure shows is what the tables
say; the subtitle names the tokens that override the target most often (escaped, whitespace visible).
"""

import html

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lens_plugins.plot import style
from lens_plugins.tokens import display_token

_COLOURS = {"first_top1": style.RIGHT, "first_top_k": "#9ecae1", "overridden": style.POSITIVE}
_OUTCOME_COLOURS = {"never": "#888888", "top_k": "#9ecae1", "overridden": style.POSITIVE, "kept": style.RIGHT}
_TOP_OVERRIDERS = 5


def surfaced_figure(surfaced) -> go.Figure:
    """Left: grouped bars per row (``first_top1``, ``first_top_k``, ``overridden``); right: the outcomes."""
    counts = surfaced.row_counts()
    summary = surfaced.summary()
    figure = make_subplots(rows=1, cols=2, column_widths=[0.75, 0.25], horizontal_spacing=0.08,
                           subplot_titles=["per row", "outcome"])
    names = {"first_top1": "first top-1", "first_top_k": f"first in top-{surfaced.k}",
             "overridden": "overridden (lost) here"}
    for column, name in names.items():
        figure.add_trace(go.Bar(x=list(counts.index), y=counts[column].tolist(), name=name,
                                marker_color=_COLOURS[column],
                                hovertemplate=f"{name} at %{{x}}: %{{y}}<extra></extra>"), row=1, col=1)
    figure.add_trace(go.Bar(x=list(summary.index), y=summary["count"].tolist(), showlegend=False,
                            marker_color=[_OUTCOME_COLOURS[o] for o in summary.index],
                            text=[f"{share:.0%}" for share in summary["share"]], textposition="outside",
                            hovertemplate="%{x}: %{y} (%{text})<extra></extra>"),
                     row=1, col=2)
    overriders = ", ".join(f"{display_token(token)} ({count})" for token, count in surfaced.overriders(_TOP_OVERRIDERS))
    target = html.escape(surfaced.target, quote=False)
    scored = int(summary["count"].sum())
    figure.update_layout(barmode="group", height=420, width=max(700, 28 * len(counts) + 300),
                         legend={"orientation": "h", "y": -0.25})
    style.finish(figure, f"Surfaced, then overridden: target {target}, {scored} scored position(s)",
                 f"most frequent overriders: {overriders}" if overriders else "")
    figure.update_xaxes(title_text="row", row=1, col=1)
    figure.update_yaxes(title_text="count", row=1, col=1)
    return figure


__all__ = ["surfaced_figure"]
