"""Plotly view of a ``SubspaceAblation``: per position, the effect of an ablation on the lens's own prediction
(x) against its effect on the model's final distribution (y), log-log, one panel per lens, the causal basis
against the random control."""

import plotly.graph_objects as go
from plotly.subplots import make_subplots

COLOURS = {"causal basis": "#b2182b", "random": "#888888"}


def subspace_ablation_figure(result) -> go.Figure:
    """One scatter panel per lens: KL on the lens (x) vs KL on the model (y), causal basis vs random."""
    from lens_plugins.methods.causal_checks import CONTROLS

    n = len(result.lens_names)
    figure = make_subplots(rows=1, cols=n, subplot_titles=result.lens_names, shared_yaxes=True)
    for i in range(n):
        for c, control in enumerate(CONTROLS):
            figure.add_trace(go.Scatter(
                x=result.lens_effect[i, c].clamp(min=1e-6).tolist(),
                y=result.model_effect[i, c].clamp(min=1e-6).tolist(), mode="markers", name=control,
                legendgroup=control, showlegend=i == 0, marker={"color": COLOURS[control], "size": 5, "opacity": 0.7}),
                row=1, col=i + 1)
        figure.update_xaxes(type="log", title_text="KL on the lens (nats)", row=1, col=i + 1)
    figure.update_yaxes(type="log", title_text="KL on the model's output (nats)", row=1, col=1)
    figure.update_layout(title=f"Mean-ablating {result.k} directions at {result.label}: lens vs model",
                         width=360 * n + 120, height=420, plot_bgcolor="white")
    return figure


__all__ = ["subspace_ablation_figure"]
