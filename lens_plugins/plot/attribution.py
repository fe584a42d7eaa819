"""Plotly views of an ``Attribution`` (bars, or a layer x head heatmap) and of a ``LogitDiff`` (rows x positions).

Red is "pushes toward the target" and blue "toward the distractor", on a scale symmetric about zero, so that
the colour of a cell never depends on the other cells' sign.
"""

import html

import plotly.graph_objects as go

from lens_plugins.core.errors import LensValueError


def _title(attribution) -> str:
    target = " / ".join(attribution.target_names)
    distractor = " / ".join(attribution.distractor_names)
    what = f"logit[{target!r}]" + (f" - logit[{distractor!r}]" if distractor else "")
    return f"Direct logit attribution of {what} at position {attribution.position}"


def attribution_figure(attribution, batch: int = 0) -> go.Figure:
    """A heatmap of head attributions (layers down, heads across) for ``by="head"``; bars otherwise."""
    title = html.escape(_title(attribution), quote=False) + f" (error {float(attribution.error[batch]):.1e})"
    if attribution.by == "head":
        grid = attribution.head_grid(batch)
        bound = float(grid.abs().max().clamp(min=1e-12))
        figure = go.Figure(go.Heatmap(
            z=grid.tolist(), x=[f"H{h}" for h in range(grid.shape[1])], y=[f"L{layer}" for layer in range(grid.shape[0])],
            colorscale="RdBu_r", zmid=0, zmin=-bound, zmax=bound, colorbar={"title": "logit"},
        ))
        figure.update_layout(title=title, xaxis_title="head", yaxis_title="layer")
        return figure
    values = attribution.values[batch].tolist()
    figure = go.Figure(go.Bar(x=attribution.labels, y=values, marker_color=["#b2182b" if v >= 0 else "#2166ac" for v in values]))
    figure.update_layout(title=title, xaxis_title=attribution.by, yaxis_title="direct logit attribution")
    return figure


def attribution_bars(attribution, n: int = 10, batch: int = 0) -> go.Figure:
    """The ``n`` largest components by magnitude as a waterfall, then the rest and the constant, ending in
    their sum, drawn against the explained logit (a dashed line): the bars add up to it (to ``error``).

    Shown at the attribution's own granularity (``by``); ``attribution.view("component")`` changes it.
    """
    if n < 1:
        raise LensValueError(f"n must be at least 1, got {n}")
    values = attribution.values[batch]
    labels = attribution.labels
    order = values.abs().argsort(descending=True)[:n].tolist()
    rest = float(values.sum() - values[order].sum())
    names = [html.escape(labels[i], quote=False) for i in order] + [f"{len(labels) - len(order)} others", "constant", "sum"]
    amounts = [float(values[i]) for i in order] + [rest, float(attribution.constant[batch]), 0.0]
    figure = go.Figure(go.Waterfall(
        x=names, y=amounts, measure=["relative"] * (len(names) - 1) + ["total"],
        increasing={"marker": {"color": "#b2182b"}}, decreasing={"marker": {"color": "#2166ac"}},
        totals={"marker": {"color": "#555555"}}, connector={"line": {"color": "#bbbbbb"}},
    ))
    explained = float(attribution.explained[batch])
    figure.add_hline(y=explained, line={"color": "#000000", "dash": "dash"},
                     annotation_text=f"explained {explained:.4g}", annotation_position="top left")
    figure.update_layout(title=html.escape(_title(attribution), quote=False) + f"<br><sup>top {len(order)} of "
                         f"{len(labels)} by |value|; sum {float(values.sum()) + float(attribution.constant[batch]):.4g}"
                         f" vs explained {explained:.4g} (error {float(attribution.error[batch]):.1e})</sup>",
                         xaxis_title=attribution.by, yaxis_title="direct logit attribution", plot_bgcolor="white")
    return figure


def logit_diff_figure(diff, batch: int = 0) -> go.Figure:
    """Rows (embedding at the bottom) x decoded positions, coloured by the logit difference."""
    grid = diff.values[:, batch]
    bound = float(grid.abs().nan_to_num(0).max().clamp(min=1e-12))
    figure = go.Figure(go.Heatmap(
        z=grid.tolist(), x=[str(p) for p in diff.positions], y=diff.labels,
        colorscale="RdBu_r", zmid=0, zmin=-bound, zmax=bound, colorbar={"title": "logit diff"},
    ))
    figure.update_layout(
        title=html.escape(f"logit[{' / '.join(diff.target_names)!r}] - logit[{' / '.join(diff.distractor_names)!r}] through the lens", quote=False),
        xaxis_title="position", yaxis_title="row",
    )
    return figure

__all__ = ["attribution_figure", "attribution_bars", "logit_diff_figure"]
