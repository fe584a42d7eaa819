"""Plotly views of an ``Attribution`` (bars, or a layer x head heatmap) and of a ``LogitDiff`` (rows x positions).

Red is "pushes toward the target" and blue "toward the distractor", on ``plot.style.DIVERGING`` symmetric about
zero, so that the colour of a cell never depends on the other cells' sign. Layers run upwards (layer 0 at the
bottom), as in every figure of ``lens_plugins.plot``.

An ``Attribution`` knows its position but not the prompt's tokens: pass ``tokens`` (``result.str_tokens(b)`` of
a lens of the same prompt, as the report does) for titles that name the token, ``token [i]``.
"""

import html
from collections.abc import Sequence
from typing import Optional

import plotly.graph_objects as go

from lens_plugins.core.errors import LensValueError
from lens_plugins.plot import style
from lens_plugins.tokens import display_token


def _title(attribution, tokens: Optional[Sequence[str]] = None) -> str:
    target = " / ".join(map(display_token, attribution.target_names))
    distractor = " / ".join(map(display_token, attribution.distractor_names))
    what = f"logit[{target}]" + (f" - logit[{distractor}]" if distractor else "")
    return f"Direct logit attribution of {what} at {style.position_label(tokens, attribution.position)}"


def attribution_figure(attribution, batch: int = 0, tokens: Optional[Sequence[str]] = None) -> go.Figure:
    """A heatmap of head attributions (layers up, layer 0 at the bottom; heads across) for ``by="head"``; bars
    otherwise. ``tokens``: the prompt's tokens, to name the attributed position in the title."""
    title = _title(attribution, tokens)
    subtitle = f"error {float(attribution.error[batch]):.1e}"
    if attribution.by == "head":
        grid = attribution.head_grid(batch)
        bound = float(grid.abs().max().clamp(min=1e-12))
        figure = go.Figure(go.Heatmap(
            z=grid.tolist(), x=[f"H{h}" for h in range(grid.shape[1])], y=[f"L{layer}" for layer in range(grid.shape[0])],
            colorscale=style.DIVERGING, zmid=0, zmin=-bound, zmax=bound, colorbar={"title": {"text": "logit"}},
            hovertemplate="%{y}%{x}: %{z:.4g} (direct logit attribution)<extra></extra>",
        ))
        figure.update_layout(xaxis_title="head", yaxis_title="layer")
        style.finish(figure, title, subtitle + "; red: towards the target, blue: towards the distractor")
        style.layer_axis(figure)
        return figure
    values = attribution.values[batch].tolist()
    figure = go.Figure(go.Bar(
        x=attribution.labels, y=values, marker_color=[style.POSITIVE if v >= 0 else style.NEGATIVE for v in values],
        hovertemplate="%{x}: %{y:.4g}<extra></extra>",
    ))
    figure.update_layout(xaxis_title=attribution.by, yaxis_title="direct logit attribution")
    style.finish(figure, title, subtitle)
    return figure


def attribution_bars(attribution, n: int = 10, batch: int = 0, tokens: Optional[Sequence[str]] = None) -> go.Figure:
    """The ``n`` largest components by magnitude (``attribution.top(n, batch, largest=None)``: unlike the default
    ``top()``, which ranks by signed value, a waterfall shows what moved the logit most either way) as a
    waterfall, then the rest and the constant, ending in their sum, drawn against the explained logit (a dashed
    line): the bars add up to it (to ``error``).

    Shown at the attribution's own granularity (``by``); ``attribution.view("component")`` changes it.
    ``tokens``: the prompt's tokens, to name the attributed position in the title.
    """
    if n < 1:
        raise LensValueError(f"n must be at least 1, got {n}")
    values = attribution.values[batch]
    labels = attribution.labels
    top = attribution.top(n, batch, largest=None)
    rest = float(values.sum()) - sum(value for _, value in top)
    names = [html.escape(label, quote=False) for label, _ in top] + [f"{len(labels) - len(top)} others", "constant", "sum"]
    amounts = [value for _, value in top] + [rest, float(attribution.constant[batch]), 0.0]
    figure = go.Figure(go.Waterfall(
        x=names, y=amounts, measure=["relative"] * (len(names) - 1) + ["total"],
        increasing={"marker": {"color": style.POSITIVE}}, decreasing={"marker": {"color": style.NEGATIVE}},
        totals={"marker": {"color": style.NEUTRAL}}, connector={"line": {"color": "#bbbbbb"}},
        hovertemplate="%{x}: %{y:+.4g}<br>running total %{final:.4g}<extra></extra>",
    ))
    explained = float(attribution.explained[batch])
    figure.add_hline(y=explained, line={"color": "#000000", "dash": "dash"},
                     annotation_text=f"explained {explained:.4g}", annotation_position="top left")
    figure.update_layout(xaxis_title=attribution.by, yaxis_title="direct logit attribution")
    style.finish(figure, _title(attribution, tokens),
                 f"top {len(top)} of {len(labels)} by |value|; sum {float(values.sum()) + float(attribution.constant[batch]):.4g}"
                 f" vs explained {explained:.4g} (error {float(attribution.error[batch]):.1e})")
    return figure


def logit_diff_figure(diff, batch: int = 0, tokens: Optional[Sequence[str]] = None) -> go.Figure:
    """Rows (embedding at the bottom) x decoded positions (``token [i]`` with the prompt's ``tokens``, else
    ``token [i]`` by index), coloured by the logit difference."""
    grid = diff.values[:, batch]
    bound = float(grid.abs().nan_to_num(0).max().clamp(min=1e-12))
    figure = go.Figure(go.Heatmap(
        z=grid.tolist(), x=[style.position_label(tokens, p) for p in diff.positions], y=diff.labels,
        colorscale=style.DIVERGING, zmid=0, zmin=-bound, zmax=bound, colorbar={"title": {"text": "logit diff"}},
        hovertemplate="%{y} at %{x}: %{z:.4g}<extra></extra>",
    ))
    figure.update_layout(xaxis_title="input token [position]", yaxis_title="row")
    style.finish(figure, f"logit[{' / '.join(map(display_token, diff.target_names))}] - "
                         f"logit[{' / '.join(map(display_token, diff.distractor_names))}] through the lens")
    style.layer_axis(figure)
    return figure

__all__ = ["attribution_figure", "attribution_bars", "logit_diff_figure"]
