"""Plotly view of an ``EarlyExitCurve``: accuracy retained against the share of layers saved, one point per
threshold, with the target retention drawn and the best threshold that meets it marked."""

import plotly.graph_objects as go

from lens_plugins.plot import style


def early_exit_figure(curve, target: float = 0.95) -> go.Figure:
    """Retention (y) against layers saved (x), each point labelled with its threshold."""
    saved, kept = curve.layers_saved.tolist(), curve.retention.tolist()
    figure = go.Figure(go.Scatter(
        x=saved, y=kept, mode="lines+markers", name="thresholds", line={"color": style.COLOURS[0]},
        text=[f"{curve.criterion} threshold {t:g}" for t in curve.thresholds.tolist()],
        hovertemplate="%{text}<br>layers saved %{x:.1%}<br>retention %{y:.1%}<extra></extra>",
    ))
    figure.add_hline(y=target, line={"color": "#888888", "dash": "dash"}, annotation_text=f"{target:.0%} retention",
                     annotation_position="bottom left")
    best = curve.layers_saved_at(target)
    figure.add_vline(x=best, line={"color": "#b2182b", "dash": "dot"},
                     annotation_text=f"{best:.1%} of layers saved", annotation_position="top right")
    figure.update_layout(
        xaxis={"title": "share of layers saved", "tickformat": ".0%", "range": [0, 1]},
        yaxis={"title": "accuracy retained (exit top-1 = model's top-1)", "tickformat": ".0%", "range": [0, 1.02]},
        width=640, height=460, showlegend=False,
    )
    style.finish(figure, f"Early exit on {curve.criterion} ({curve.tokens} tokens, {curve.n_layers} layers)")
    return figure


__all__ = ["early_exit_figure"]
