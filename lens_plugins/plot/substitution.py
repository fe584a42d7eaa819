"""Plotly view of a ``SubstitutionResult``: per block, the share of the model's final top-1 retained when the
block's attention or MLP is replaced by its linear shortcut, and the mean KL it costs, a line per sublayer."""

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lens_plugins.plot import style

NAMES = {"attn": "attention", "mlp": "MLP"}


def substitution_figure(result) -> go.Figure:
    """Two panels over the blocks: retained share (left) and mean ``KL(clean || substituted)`` (right)."""
    retained, kl = result.retained(), result.kl.mean(-1)
    figure = make_subplots(rows=1, cols=2, subplot_titles=["final top-1 retained", "KL(clean || substituted) (nats)"])
    for j, sublayer in enumerate(result.sublayers):
        name = NAMES.get(sublayer, sublayer)
        for col, values, fmt in ((1, retained[:, j], ".1%"), (2, kl[:, j], ".3g")):
            figure.add_trace(go.Scatter(
                x=result.layers, y=values.tolist(), mode="lines+markers", name=name, legendgroup=sublayer,
                showlegend=col == 1, line={"color": style.COLOURS[j % len(style.COLOURS)]},
                hovertemplate=f"{name} of block %{{x}}: %{{y:{fmt}}}<extra></extra>"), row=1, col=col)
    figure.update_xaxes(title_text="block substituted", showgrid=True, gridcolor=style.GRID)
    figure.update_yaxes(tickformat=".0%", range=[0, 1.02], row=1, col=1)
    figure.update_yaxes(showgrid=True, gridcolor=style.GRID)
    style.finish(figure, f"Sublayer substitution by linear shortcuts ({result.tokens} tokens)")
    figure.update_layout(width=1100, height=460)
    return figure

__all__ = ["NAMES", "substitution_figure"]
