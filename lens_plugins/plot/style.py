"""The one style of every figure in ``lens_plugins.plot`` and the HTML report, so that figures side by side agree.

- **Layers run upwards**: the embedding (L0, "embed") at the bottom and the model's output at the top, in the lens
  heatmap, the head-DLA grid, the model view and the sink view alike (``layer_axis``), so reading upwards follows the
  forward pass everywhere.
- **Two colour maps**: ``SEQUENTIAL`` for every quantity that runs from nothing to much (probability, attention,
  divergences; ranks reversed, so that rank 1 is dark) and ``DIVERGING`` for signed ones (attributions, logit
  differences), always symmetric about zero.
- **Positions** are ``token [i]`` (``position_label``): the token with its index in the prompt, never a bare
  "position -1".
- **Token text** follows ``lens_plugins.tokens``'s one glyph convention (``·`` space, ``¶`` newline, ``→`` tab),
  HTML-escaped.
- **Hovers** are always ours: every trace carries a ``hovertemplate`` or is skipped (``hoverinfo="skip"``),
  never plotly's default ``x, y, z`` box (``custom_hovers`` checks a figure).
- **Margins** leave a band at the top for plotly's modebar, so it never sits on the title or its subtitle
  (``finish``).
- **Log-rank axes** label the decades only (1, 10, 100, ...), with no 2s and 5s in between (``log_rank_axis``).
"""

from collections.abc import Sequence
from typing import Optional

import plotly.graph_objects as go

from lens_plugins.tokens import display_token

SEQUENTIAL = "Blues"  # light = little, dark = much; colourblind-safe and legible under black cell text
DIVERGING = "RdBu_r"  # red = positive (towards the target), blue = negative, white = 0
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
POSITIVE, NEGATIVE, NEUTRAL = "#b2182b", "#2166ac", "#555555"  # bars: the two ends of DIVERGING, and totals
RIGHT = "#1a7f37"  # a next token the model predicts correctly
GRID = "#eeeeee"
FONT = {"family": "Open Sans, verdana, arial, sans-serif", "size": 12}
MODEBAR_PX = 36  # the band at the top that plotly's modebar occupies (about 30 px), kept free of text
TITLE_LINE_PX, SUBTITLE_LINE_PX = 24, 17
ROBUST_PERCENTILE = 99.0  # where a divergence heatmap's colour is clipped (of the non-embedding rows)


def position_label(tokens: Optional[Sequence[str]], position: int) -> str:
    """``token [i]``: the token at ``position`` (negative: from the prompt's end, resolved to its index), escaped
    with whitespace visible; without ``tokens``, ``token [position]`` (an ``Attribution`` knows no tokens)."""
    if tokens is None:
        return f"token [{position}]"
    index = position if position >= 0 else len(tokens) + position
    return f"{display_token(tokens[index])} [{index}]"


def layer_axis(figure: go.Figure) -> None:
    """Layer 0 (or the embedding row) at the bottom of every y axis: an explicit range runs upwards, and no axis
    is reversed (``upwards`` is the check)."""
    def up(axis):
        if axis.range is not None and axis.range[0] is not None and axis.range[0] > axis.range[1]:
            axis.range = [axis.range[1], axis.range[0]]
        if axis.autorange == "reversed":
            axis.autorange = True

    figure.for_each_yaxis(up)


def upwards(axis) -> bool:
    """Whether a y axis draws its first row or category at the bottom (plotly's default direction)."""
    if axis.autorange == "reversed":
        return False
    return axis.range is None or axis.range[0] is None or axis.range[0] < axis.range[1]


def log_rank_axis(figure: go.Figure, top: float, **where) -> None:
    """A log y axis of ranks from 1 to ``top``, labelled at the decades only (``dtick=1`` on a log axis: every
    power of 10), so that rank 1 always has its label."""
    import math

    high = math.log10(max(top, 10.0))
    figure.update_yaxes(type="log", dtick=1, minor={"showgrid": False}, range=[-0.05 * high, 1.05 * high], **where)


def top_margin(title_lines: int) -> int:
    """The top margin of a figure whose title has ``title_lines`` lines (the first at the title's size, the
    others subtitle lines): the modebar's band, then the title."""
    return MODEBAR_PX + TITLE_LINE_PX + SUBTITLE_LINE_PX * (title_lines - 1) + 10


def finish(figure: go.Figure, title: str, subtitle: str = "", *, extra_top: int = 0) -> go.Figure:
    """The common layout: a title (and a smaller subtitle) placed below the modebar's band, a white plot area,
    the one font, and a top margin that fits them (``extra_top`` more pixels for a top axis)."""
    text = title + (f"<br><sup>{subtitle}</sup>" if subtitle else "")
    lines = 1 + text.count("<br>")
    margin = dict(figure.layout.margin.to_plotly_json()) if figure.layout.margin else {}
    margin["t"] = max(margin.get("t") or 0, top_margin(lines) + extra_top)
    figure.update_layout(
        title={"text": text, "x": 0.01, "xanchor": "left", "y": 1.0, "yref": "container", "yanchor": "top",
               "pad": {"t": MODEBAR_PX}},
        font=FONT, plot_bgcolor="white", margin=margin, hoverlabel={"align": "left"},
    )
    return figure


def custom_hovers(figure: go.Figure) -> list[str]:
    """The names of the traces of ``figure`` that would show plotly's default hover (empty: all custom)."""
    bad = []
    for i, trace in enumerate(figure.data):
        if trace.hoverinfo == "skip" or trace.hovertemplate:
            continue
        bad.append(f"{i}: {trace.type} {trace.name!r}")
    return bad


__all__ = ["SEQUENTIAL", "DIVERGING", "COLOURS", "POSITIVE", "NEGATIVE", "NEUTRAL", "RIGHT", "GRID", "FONT",
           "MODEBAR_PX", "TITLE_LINE_PX", "SUBTITLE_LINE_PX", "ROBUST_PERCENTILE", "position_label", "layer_axis", "upwards",
           "log_rank_axis", "top_margin", "finish", "custom_hovers"]
