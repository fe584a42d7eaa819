"""Plotly views of a ``LensResult``: the lens heatmap, trajectories across rows, lens comparisons, a report.

The heatmap follows nostalgebraist's logit-lens plots: the embedding row at the bottom, the model's own
output at the top, one column per decoded prompt position, each cell labelled with the lens's top-1 token,
the actual next token along the top axis, and an outline on every cell whose top-1 already is the model's
final top-1. Every figure takes its numbers from a result object, never from a model. Reports inline
plotly.js, because the clusters these run on often have no internet for a CDN.

Token text is shown as text: HTML-escaped (plotly renders text as pseudo-HTML, so '<|im_start|>' or
'<script>' would otherwise vanish or be parsed), whitespace made visible with glyphs that Liberation Sans
has (the font Debian's Chromium falls back to for plotly's "Open Sans, verdana, arial"): '·' for a space,
'¶' for a newline, '→' for a tab; the open box '␣' is not in it and renders as an unrelated fallback glyph.
"""

import html
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from lens_plugins.core import track
from lens_plugins.core.errors import LensIndexError, LensValueError
from lens_plugins.core.reductions import METRIC_STYLES
from lens_plugins.files import atomic_write, check_file
from lens_plugins.methods.result import METRICS, LensResult
from lens_plugins.plot import style
from lens_plugins.tokens import display_token, visible_text

# Above this many positions a cell is too narrow for its token, so the cells carry colour only
# (the hover still names every top-k token).
MAX_TEXT_POSITIONS = 64
_CELL_CHARS = 7  # a cell shows at most this many characters of its token
_CELL_PX = 52  # width of one position when cells carry text
_ROW_PX = 22
_CHAR_PX = 6.5  # about one character of a tick label at 12 px: wider labels than a cell are tilted

# Colour direction and axis title per metric, from the reductions table; the map is ``style.SEQUENTIAL``. Dark
# means "confident" for prob and rank, and "far from the model's own answer" for entropy and divergences.
_STYLE = METRIC_STYLES
_TARGET_METRIC = re.compile(r"(rank|logprob)\[(.+)\]", re.DOTALL)
_OUTLINE = "top-1 = final top-1"
_RIGHT = style.RIGHT  # the top axis colours a next token the model predicts correctly
# Divergences: the embedding row's (~110 nats on SmolLM2) would saturate the scale, so their colour is clipped at
# a robust percentile of the other rows unless zmax is given.
CLIPPED_METRICS = ("kl_final_row", "kl_row_final", "kl_input_row", "kl_next_row", "js_final")

DEFAULT_REPORT_METRICS = ("prob", "entropy", "kl_final_row", "final_top1_rank", "next_token_rank")

# Whitespace and control characters made visible; every glyph here is in Liberation Sans and DejaVu Sans.
def available_metrics(target_names: Sequence[str] = ()) -> list[str]:
    """Every metric a result with these targets can be coloured by: ``METRICS`` plus ``rank[t]`` and
    ``logprob[t]`` for each target ``t`` (the same names as ``to_dataframe``'s columns). Taking names
    rather than a result lets the CLI check ``--metric`` before it spends seconds loading a model."""
    per_target = [f"{kind}[{name}]" for name in target_names for kind in ("rank", "logprob")]
    return list(METRICS) + per_target


def check_metric(metric: str, target_names: Sequence[str] = ()) -> None:
    if metric not in available_metrics(target_names):
        raise LensValueError(f"unknown metric {metric!r}; choose one of {available_metrics(target_names)}"
                         + ("" if target_names else " (target metrics need targets=[...] when computing the lens)"))


def metric_values(result: LensResult, metric: str) -> Tensor:
    """``[row, batch, pos]`` float values of ``metric``; ranks keep their raw value (-1 where undefined)."""
    check_metric(metric, result.target_names)
    target = _TARGET_METRIC.fullmatch(metric)
    if target is not None:
        kind, name = target.groups()
        return (result.rank_of(name) if kind == "rank" else result.logprob_of(name)).float()
    return result.metric(metric)


def is_rank_metric(metric: str) -> bool:
    return metric.endswith("_rank") or metric.startswith("rank[")


def position_labels(result: LensResult, batch: int = 0, positions: Optional[Sequence[int]] = None) -> list[str]:
    """x-axis labels: the input token at each decoded position, with its index in the prompt (``token [i]``)."""
    tokens = result.str_tokens(batch)
    return [style.position_label(tokens, p) for p in (result.positions if positions is None else positions)]


def _check_batch(result: LensResult, batch: int) -> None:
    n = result.token_ids.shape[0]
    if not 0 <= batch < n:
        raise LensIndexError(f"batch {batch} is out of range: this result holds {n} prompt(s), batch 0..{n - 1}")


def _short(token: str) -> str:
    return token if len(token) <= _CELL_CHARS else token[: _CELL_CHARS - 1] + "…"


def _format(metric: str, value: float) -> str:
    if math.isnan(value) or (is_rank_metric(metric) and value < 0):
        return "n/a (no next token)"
    return f"{int(value)}" if is_rank_metric(metric) else f"{value:.3g}"


def row_selection(n_rows: int, stride: int = 1) -> list[int]:
    """Every ``stride``-th row from the embedding up, always keeping the final row (the model's output)."""
    if stride < 1:
        raise LensValueError(f"layer_stride must be at least 1, got {stride}")
    rows = list(range(0, n_rows, stride))
    return rows if rows[-1] == n_rows - 1 else rows + [n_rows - 1]


def position_selection(result: LensResult, positions: Union[None, slice, Sequence[int]]) -> list[int]:
    """Indices along the ``pos`` axis of a window: a slice of the decoded positions (``slice(-8, None)``:
    the last eight) or prompt positions (negative from the prompt's end), which must have been decoded."""
    if positions is None:
        return list(range(len(result.positions)))
    if isinstance(positions, slice):
        chosen = list(range(len(result.positions)))[positions]
        if not chosen:
            raise LensValueError(f"positions {positions} selects none of the {len(result.positions)} decoded positions")
        return chosen
    chosen = list(dict.fromkeys(result.pos_index(p) for p in positions))
    if not chosen:
        raise LensValueError("positions is empty: name at least one prompt position, or pass None for all")
    return sorted(chosen)


def final_top1(result: LensResult) -> Tensor:
    """``[batch, pos]`` ids of the model's own top-1 (the final row's)."""
    if result.final_top1 is not None:
        return result.final_top1
    return result._require("top_ids")[-1, ..., 0]


def next_tokens(result: LensResult, batch: int) -> list[Optional[int]]:
    """The actual next token after each decoded position (``None`` after the prompt's last token or on padding)."""
    ids = result.token_ids[batch].tolist()
    mask = result.attention_mask[batch].tolist()
    return [ids[p + 1] if p + 1 < len(ids) and mask[p + 1] else None for p in result.positions]


def top_axis_labels(result: LensResult, batch: int, pos_idx: Sequence[int]) -> list[str]:
    """The top axis: the actual next token per position, green and marked '●' where the final top-1 is it."""
    final = final_top1(result)[batch].tolist()
    nxt = next_tokens(result, batch)
    labels = []
    for p in pos_idx:
        if nxt[p] is None:
            labels.append("(end)")
        elif final[p] == nxt[p]:
            labels.append(f'<span style="color:{_RIGHT}"><b>● {display_token(result.token(nxt[p]))}</b></span>')
        else:
            labels.append(display_token(result.token(nxt[p])))
    return labels


def agreement_cells(result: LensResult, batch: int, rows: Sequence[int], pos_idx: Sequence[int]) -> list[tuple[int, int]]:
    """``(i, j)`` indices into the shown rows and positions whose top-1 equals the final top-1."""
    agree = result.top1_agreement()[:, batch] if result.final_top1 is not None else (
        result.top_ids[:, batch, :, 0] == result.top_ids[-1, batch, :, 0])
    return [(i, j) for i, r in enumerate(rows) for j, p in enumerate(pos_idx) if bool(agree[r, p])]


def _outline_path(cells: Sequence[tuple[int, int]]) -> tuple[list, list]:
    """One closed square per cell, separated by ``None``: a single cheap trace for any number of cells."""
    xs, ys = [], []
    for i, j in cells:
        xs += [j - 0.5, j + 0.5, j + 0.5, j - 0.5, j - 0.5, None]
        ys += [i - 0.5, i - 0.5, i + 0.5, i + 0.5, i - 0.5, None]
    return xs, ys


def outlined_cells(figure: go.Figure, facet: int = 0) -> set[tuple[int, int]]:
    """The ``(row, position)`` indices outlined in facet ``facet`` of a ``lens_heatmap``: read back from the
    figure's own data (what a test compares with ``top1_agreement``)."""
    traces = [t for t in figure.data if t.name == _OUTLINE]
    x, y = traces[facet].x, traces[facet].y
    return {(round(y[k] + 0.5), round(x[k] + 0.5)) for k in range(0, len(x), 6)}


def _hover(result: LensResult, metric: str, values: Tensor, batch: int, rows: Sequence[int], pos_idx: Sequence[int]) -> list[list[str]]:
    """Per cell: row, position, metric value, the top-k with probabilities and the actual next token."""
    tokens = result.str_tokens(batch)
    ids = result.top_ids[:, batch].tolist()
    probs = result.top_probs[:, batch].tolist()
    nxt = next_tokens(result, batch)
    hover = []
    for r in rows:
        line = []
        for p in pos_idx:
            position = result.positions[p]
            top = "<br>".join(
                f"  {display_token(result.token(i))}  {q:.3f}" for i, q in zip(ids[r][p], probs[r][p])
            )
            after = display_token(result.token(nxt[p])) if nxt[p] is not None else "(end of prompt)"
            line.append(
                f"<b>{result.labels[r]}</b> at {display_token(tokens[position])} [{position}]<br>"
                f"{metric}: {_format(metric, float(values[r, p]))}<br>"
                f"top-{len(ids[r][p])}:<br>{top}<br>"
                f"next token: {after}"
            )
        hover.append(line)
    return hover


LOG_FLOOR = 1e-3  # log colour of a non-rank metric: values below this (a divergence of 0) share the lowest colour


def _colour_values(values: Tensor, rank: bool, log: bool, floor: float) -> Tensor:
    """What a cell's colour encodes: the value itself, log10(rank) (NaN where no rank exists), or with ``log``
    log10 of the value floored at ``floor``."""
    if rank:
        return torch.where(values >= 1, values.clamp(min=1).log10(), torch.full_like(values, math.nan))
    if log:
        return values.clamp(min=floor).log10()
    return values


def robust_max(values: Tensor, labels: Sequence[str], percentile: float = style.ROBUST_PERCENTILE) -> Optional[float]:
    """The ``percentile``-th percentile of the finite values of every row but the embedding row (``values`` is
    ``[row, ...]``, ``labels`` its row labels): where a divergence heatmap's colour is clipped, so that the
    embedding row (~110 nats) does not make every other row look alike. ``None`` when nothing is left."""
    rest = values[[i for i, label in enumerate(labels) if label != "embed"]]
    rest = rest[torch.isfinite(rest)]
    if rest.numel() == 0:
        return None
    return float(torch.quantile(rest.double(), percentile / 100.0))


def _colour_range(metric: str, values: Tensor, labels: Sequence[str], rank: bool, log: bool,
                  zmin: Optional[float], zmax: Optional[float]) -> tuple[Optional[float], Optional[float], str]:
    """``(cmin, cmax, note)`` of the colour axis, in the units of ``_colour_values``; the note says on the colour
    bar when the colour is clipped at a robust percentile."""
    note = ""
    if metric == "prob" and not log:
        zmin, zmax = (0.0 if zmin is None else zmin), (1.0 if zmax is None else zmax)
    if zmax is None and metric in CLIPPED_METRICS and not rank:
        clip = robust_max(values, labels)
        top = float(values[torch.isfinite(values)].max()) if torch.isfinite(values).any() else None
        if clip is not None and top is not None and clip < top:
            zmax = clip
            note = (f"<br>clipped at {clip:.3g}: the {style.ROBUST_PERCENTILE:g}th percentile<br>"
                    f"of non-embedding rows (max {top:.3g})")
    if rank or log:
        floor = 1.0 if rank else LOG_FLOOR
        zmin = None if zmin is None else math.log10(max(zmin, floor))
        zmax = None if zmax is None else math.log10(max(zmax, floor))
    return zmin, zmax, note


def lens_heatmap(
    result: LensResult,
    metric: str = "prob",
    batch: Union[int, Sequence[int]] = 0,
    *,
    layer_stride: int = 1,
    positions: Union[None, slice, Sequence[int]] = None,
    outline: bool = True,
    zmin: Optional[float] = None,
    zmax: Optional[float] = None,
    log: Optional[bool] = None,
) -> go.Figure:
    """Rows x positions heatmap of ``metric``, each cell labelled with its top-1; one facet per prompt.

    Rows run from the embedding (bottom) to the final residual stream (top), so reading upwards follows
    the forward pass; ``layer_stride`` keeps every n-th row (and always the final one). ``positions`` is a
    window: a slice of the decoded positions or a list of prompt positions. ``batch`` may list several
    prompts, each a facet, sharing one colour scale. The top axis names the actual next token, green with
    '●' where the model's final top-1 is it; with ``outline``, cells whose top-1 already equals the final
    top-1 are outlined. Rank metrics are coloured on a log10 scale (ranks span 1 to the vocabulary size);
    their ``z`` is ``log10(rank)``, NaN where no rank exists. Hover shows the row's top-k.

    Colour: ``style.SEQUENTIAL`` (reversed for ranks, so that rank 1 is dark). ``zmin`` / ``zmax`` fix its
    range, in the metric's units. Divergences (``CLIPPED_METRICS``) are clipped by default at the 99th
    percentile of the non-embedding rows (``robust_max``), which the colour bar says: the embedding row's
    KL (~110 nats on SmolLM2) would otherwise make every other row look alike; the hover keeps exact values.
    ``log=True`` colours ``log10(value)`` (floored at ``LOG_FLOOR``; ``z`` is then that log), the default
    for ranks only; log-probabilities, being negative, cannot be.
    """
    batches = [batch] if isinstance(batch, int) else list(batch)
    if not batches:
        raise LensValueError("batch is empty: name at least one prompt index")
    for b in batches:
        _check_batch(result, b)
    values = metric_values(result, metric).cpu()
    rows = row_selection(len(result.labels), layer_stride)
    pos_idx = position_selection(result, positions)
    rank = is_rank_metric(metric)
    if log is None:
        log = rank
    if rank and not log:
        raise LensValueError(f"{metric} is a rank, coloured on a log scale only (ranks span 1 to the vocabulary size)")
    if log and not rank and "logprob" in metric:
        raise LensValueError(f"log=True on {metric}: log-probabilities are negative; colour them as they are")
    if zmin is not None and zmax is not None and zmin >= zmax:
        raise LensValueError(f"zmin={zmin} must be below zmax={zmax}")
    direction, title = _STYLE.get(metric, ("sequential_r", metric) if rank else ("sequential", metric))
    raw = values[rows][:, batches][:, :, pos_idx]
    shown = _colour_values(raw, rank, log, LOG_FLOOR)
    cmin, cmax, note = _colour_range(metric, raw, [result.labels[r] for r in rows], rank, log, zmin, zmax)
    colorbar: dict = {"title": {"text": title + (" (log scale)" if log else "") + note, "side": "right"}}
    finite = shown[torch.isfinite(shown)]
    low = float(finite.min()) if finite.numel() else 0.0
    high = float(finite.max()) if finite.numel() else 1.0
    if (cmin is None) != (cmax is None):  # plotly honours a colour bound only when both are set
        cmin, cmax = (min(low, cmax) if cmin is None else cmin), (max(high, cmin) if cmax is None else cmax)
    if log:
        ticks = list(range(math.floor(low if cmin is None else cmin), math.ceil(high if cmax is None else cmax) + 1))
        colorbar.update(tickvals=ticks, ticktext=[f"{10.0 ** t:,.0f}" if t >= 0 else f"{10.0 ** t:g}" for t in ticks])

    n_pos, n_rows = len(pos_idx), len(rows)
    with_text = n_pos <= MAX_TEXT_POSITIONS
    facets = len(batches)
    bottoms = {b: position_labels(result, b, [result.positions[p] for p in pos_idx]) for b in batches}
    tops = {b: top_axis_labels(result, b, pos_idx) for b in batches}
    # Tilted tick labels need room above and below each facet; the spacing is set in pixels, then
    # converted to make_subplots' fraction of the plot area.
    widest = max(len(html.unescape(label)) for labels in bottoms.values() for label in labels)
    tilted = n_pos > 8 or widest * _CHAR_PX > _CELL_PX
    angle = -45 if tilted else 0
    top_px, bottom_px, caption_px = (95, 120, 24) if tilted else (30, 50, 24)
    plot_px = _ROW_PX * n_rows
    gap_px = bottom_px + top_px + caption_px + 10
    area_px = facets * plot_px + (facets - 1) * gap_px
    figure = make_subplots(rows=facets, cols=1, vertical_spacing=gap_px / area_px if facets > 1 else 0.0)
    for f, b in enumerate(batches):
        z = shown[:, f]
        top1 = [[_short(display_token(result.token(result.top_ids[r, b, p, 0]))) for p in pos_idx] for r in rows]
        figure.add_trace(go.Heatmap(
            z=z.tolist(), x=list(range(n_pos)), y=list(range(n_rows)), coloraxis="coloraxis",
            text=top1, texttemplate="%{text}" if with_text else None, textfont={"size": 10},
            customdata=_hover(result, metric, values[:, b], b, rows, pos_idx),
            hovertemplate="%{customdata}<extra></extra>", xgap=1, ygap=1, name=f"prompt {b}",
        ), row=f + 1, col=1)
        if outline:
            xs, ys = _outline_path(agreement_cells(result, b, rows, pos_idx))
            figure.add_trace(go.Scatter(
                x=xs, y=ys, mode="lines", line={"color": "#111111", "width": 1.6}, hoverinfo="skip",
                name=_OUTLINE, showlegend=False,
            ), row=f + 1, col=1)
        suffix = "" if f == 0 else str(f + 1)
        figure.add_trace(go.Scatter(  # an invisible trace so that plotly draws the top axis
            x=[0, n_pos - 1], y=[0, 0], xaxis=f"x{facets + f + 1}", yaxis=f"y{suffix}", mode="markers",
            marker={"opacity": 0}, hoverinfo="skip", showlegend=False, name="next tokens",
        ))
        figure.layout[f"xaxis{facets + f + 1}"] = dict(
            overlaying=f"x{suffix}", side="top", anchor=f"y{suffix}", range=[-0.5, n_pos - 0.5],
            tickmode="array", tickvals=list(range(n_pos)), ticktext=tops[b],
            showgrid=False, zeroline=False, tickangle=angle, tickfont={"size": 11},
        )
        figure.update_xaxes(
            range=[-0.5, n_pos - 0.5], tickmode="array", tickvals=list(range(n_pos)), ticktext=bottoms[b],
            tickangle=angle, showgrid=False, zeroline=False,
            title_text="input token [position]" if f == facets - 1 else None, row=f + 1, col=1,
        )
        figure.update_yaxes(
            range=[-0.5, n_rows - 0.5], tickmode="array", tickvals=list(range(n_rows)),
            ticktext=[result.labels[r] for r in rows], showgrid=False, zeroline=False,
            title_text="row", row=f + 1, col=1,
        )
        if facets > 1:  # which prompt, above the facet's next-token axis
            prompt = visible_text("".join(result.str_tokens(b)))
            figure.add_annotation(
                text=html.escape(f"prompt {b}: " + (prompt if len(prompt) <= 100 else prompt[:99] + "…"), quote=False),
                xref="paper", x=0, xanchor="left", yref=f"y{suffix} domain", y=1, yanchor="bottom",
                yshift=top_px + 2, showarrow=False, font={"size": 12},
            )
    what = f"logit lens: {title}" + ("" if with_text else " (hover for tokens)")
    legend = (f"top axis: the actual next token, <span style=\"color:{_RIGHT}\">● green</span> where the model's "
              "top-1 is it" + ("<br>outlined: cells whose top-1 already is the final top-1" if outline else ""))
    figure.update_layout(
        coloraxis={"colorscale": style.SEQUENTIAL, "reversescale": direction == "sequential_r", "colorbar": colorbar,
                   "cmin": cmin, "cmax": cmax},
        width=max(640, 260 + (_CELL_PX if with_text else max(8, min(_CELL_PX, 2400 // n_pos))) * n_pos),
        margin={"l": 80, "r": 40, "t": 0, "b": bottom_px + 30}, showlegend=False,
    )
    style.finish(figure, what, legend, extra_top=top_px + (caption_px if facets > 1 else 0))
    figure.update_layout(height=area_px + figure.layout.margin.t + bottom_px + 30)
    style.layer_axis(figure)
    return figure


def heatmap_values(figure: go.Figure, facet: int = 0) -> list[list[float]]:
    """The ``z`` grid of facet ``facet`` of a ``lens_heatmap`` (rows bottom-up, shown positions)."""
    return [t for t in figure.data if isinstance(t, go.Heatmap)][facet].z


# --- trajectories -------------------------------------------------------------------------------------

_KINDS = ("prob", "rank", "logprob")


def _series(result: LensResult, name: str, kind: str, is_set: bool) -> Tensor:
    """``[row, batch, pos]`` of a target (``rank_of``/``logprob_of``) or a token set (``set_*``)."""
    if kind not in _KINDS:
        raise LensValueError(f"kind={kind!r}: choose one of {_KINDS}")
    if is_set:
        return {"prob": result.set_prob, "rank": result.set_rank, "logprob": lambda n: result.set_logprobs[..., result._set_index(n)]}[kind](name).float()
    if kind == "prob":
        return result.logprob_of(name).exp()
    return (result.rank_of(name) if kind == "rank" else result.logprob_of(name)).float()


_COLOURS = style.COLOURS
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def _translucent(colour: str) -> str:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},0.2)"


def _hover_name(name: str) -> str:
    return name.replace("%", "&#37;")  # '%{' would start a hovertemplate field


def _lines(figure: go.Figure, x: list[str], values: Tensor, name: str, colour: str, prompts: Sequence[int], *,
           band: bool = False, is_set: bool = False, row: int = 1, col: int = 1, subplots: bool = False,
           unified: bool = True) -> None:
    """The traces of one series (``values [row, prompt]``): a line per prompt (dashed differently, named
    ``name · prompt b``), or with ``band`` and several prompts the mean with a min-max band. A token set is a
    wide translucent line drawn under its members' thin ones, so that it never hides a target's line."""
    where = {"row": row, "col": col} if subplots else {}
    x_part = "" if unified else "%{x}: "
    if band and values.shape[1] > 1:
        low, high = values.nan_to_num(nan=math.inf).min(1).values, values.nan_to_num(nan=-math.inf).max(1).values
        figure.add_trace(go.Scatter(x=x, y=high.tolist(), mode="lines", line={"width": 0}, showlegend=False,
                                    hoverinfo="skip", legendgroup=name, name=f"{name} max"), **where)
        figure.add_trace(go.Scatter(x=x, y=low.tolist(), mode="lines", line={"width": 0}, fill="tonexty",
                                    fillcolor=_translucent(colour), showlegend=False, hoverinfo="skip",
                                    legendgroup=name, name=f"{name} min"), **where)
        label = f"{name} (mean of {values.shape[1]}, band: min to max)"
        figure.add_trace(go.Scatter(
            x=x, y=values.nanmean(1).tolist(), mode="lines" if is_set else "lines+markers", legendgroup=name,
            name=label, line={"color": colour, "width": 7 if is_set else 2}, opacity=0.4 if is_set else 1.0,
            hovertemplate=f"{_hover_name(name)} (mean): {x_part}%{{y:.3g}}<extra></extra>"), **where)
        return
    for j, b in enumerate(prompts):
        label = name if len(prompts) == 1 else f"{name} · prompt {b}"
        figure.add_trace(go.Scatter(
            x=x, y=values[:, j].tolist(), mode="lines" if is_set else "lines+markers", name=label, legendgroup=name,
            line={"color": colour, "dash": _DASHES[j % len(_DASHES)], "width": 7 if is_set else 2},
            opacity=0.4 if is_set else 1.0, hovertemplate=f"{_hover_name(label)}: {x_part}%{{y:.3g}}<extra></extra>",
        ), **where)


def _batches(result_batch: int, batch: Union[None, int, Sequence[int]]) -> list[int]:
    chosen = list(range(result_batch)) if batch is None else ([batch] if isinstance(batch, int) else list(batch))
    for b in chosen:
        if not 0 <= b < result_batch:
            raise LensIndexError(f"batch {b} is out of range: this result holds {result_batch} prompt(s)")
    return chosen


def _at(result: LensResult, position: int, chosen: Sequence[int]) -> str:
    """``token [i]`` of a position in a title: the token when every chosen prompt has the same one there."""
    same = len({result.str_tokens(b)[position] for b in chosen}) == 1
    return style.position_label(result.str_tokens(chosen[0]) if same else None, position)


def _highest(figure: go.Figure) -> float:
    """The largest finite y of a figure's traces (a rank axis's top)."""
    values = [y for t in figure.data if t.y is not None for y in t.y if y is not None and math.isfinite(y)]
    return max(values, default=1.0)


def _trajectory_layout(figure: go.Figure, title: str, kind: str) -> None:
    style.finish(figure, title)
    figure.update_layout(xaxis_title="residual stream row", yaxis_title=kind, hovermode="x unified")
    figure.update_xaxes(type="category", showgrid=True, gridcolor=style.GRID)
    figure.update_yaxes(showgrid=True, gridcolor=style.GRID, range=[0, 1.02] if kind == "prob" else None)
    if kind == "rank":
        style.log_rank_axis(figure, _highest(figure))


def trajectory_figure(
    result: LensResult,
    targets: Optional[Sequence[str]] = None,
    sets: Optional[Sequence[str]] = None,
    kind: str = "prob",
    pos: int = -1,
    batch: Union[None, int, Sequence[int]] = None,
    *,
    band: bool = False,
) -> go.Figure:
    """Probability, rank or log-prob of targets and token sets across rows, at prompt position ``pos``.

    Defaults: every target and set of the result, every prompt of the batch, one line per prompt (prompts
    with different answers are not averaged; ``band=True`` draws the mean with a band from the minimum to
    the maximum); a result with neither targets nor sets but with ``auto_tokens=N`` draws the tracked tokens
    of prompt ``batch`` (``tracked_figure``). Ranks are drawn on a log axis labelled at the decades. A token
    set is a wide translucent line under the targets' thin ones. The points are exactly
    ``rank_of``/``logprob_of`` (exp'd for ``prob``) or ``set_prob``/``set_rank``.
    """
    targets = list(result.target_names if targets is None else targets)
    sets = list(result.set_names if sets is None else sets)
    one_prompt = isinstance(batch, int) or (batch is None and result.token_ids.shape[0] == 1)
    if not targets and not sets and result.auto_ids is not None and one_prompt:
        return tracked_figure(result, kind, pos, batch or 0)
    if not targets and not sets:
        raise LensValueError("nothing to trace: compute the lens with targets=[...], token_sets={...} or "
                             "auto_tokens=N, or name them here")
    p = result.pos_index(pos)
    chosen = _batches(result.token_ids.shape[0], batch)
    figure = go.Figure()
    # Sets first, so that the targets' lines are drawn over them; each series keeps its colour either way.
    series = [(i, name, False) for i, name in enumerate(targets)] + [(len(targets) + i, name, True) for i, name in enumerate(sets)]
    for i, name, is_set in sorted(series, key=lambda item: not item[2]):
        values = _series(result, name, kind, is_set)[:, chosen, p]
        if kind == "rank":
            values = values.masked_fill(values < 1, math.nan)
        _lines(figure, list(result.labels), values, ("set " if is_set else "") + display_token(name),
               _COLOURS[i % len(_COLOURS)], chosen, band=band, is_set=is_set)
    summary = f" (mean of {len(chosen)} prompts)" if band and len(chosen) > 1 else ""
    _trajectory_layout(figure, f"{kind} across rows at {_at(result, result.positions[p], chosen)}{summary}", kind)
    return figure


def tracked_figure(result: LensResult, kind: str = "prob", pos: int = -1, batch: int = 0) -> go.Figure:
    """The trajectories of the tokens ``auto_tokens=N`` chose at prompt position ``pos`` (``LensResult.tracked``),
    each named with why it was chosen: the final top-1, then tokens that surfaced at an intermediate row and
    faded. ``kind`` is ``"prob"`` or ``"logprob"`` (the lens computes no rank for them)."""
    if kind not in ("prob", "logprob"):
        raise LensValueError(f"kind={kind!r}: tracked tokens have 'prob' and 'logprob' trajectories (no ranks)")
    _batches(result.token_ids.shape[0], batch)
    figure = go.Figure()
    for i, chosen in enumerate(result.tracked(pos, batch)):
        values = torch.tensor(chosen["probs"])
        values = values if kind == "prob" else values.log()
        peak = f", peak at {chosen['peak_row']}" if chosen["reason"] != track.REASONS[track.FINAL_TOP1] else ""
        name = f"{display_token(chosen['token'])} ({chosen['reason']}{peak})"
        figure.add_trace(go.Scatter(x=list(result.labels), y=values.tolist(), mode="lines+markers", name=name,
                                    line={"color": _COLOURS[i % len(_COLOURS)]},
                                    hovertemplate=f"{_hover_name(display_token(chosen['token']))}: %{{y:.3g}}<extra></extra>"))
    position = result.positions[result.pos_index(pos)]
    _trajectory_layout(figure, f"tracked tokens: {kind} across rows at {_at(result, position, [batch])}", kind)
    figure.update_layout(legend={"orientation": "h", "y": -0.3})
    return figure


def metric_trajectory(result: LensResult, metrics: Sequence[str] = ("entropy", "kl_final_row"), pos: int = -1,
                      batch: Union[None, int, Sequence[int]] = 0, *, band: bool = False) -> go.Figure:
    """Any ``[row, batch, pos]`` metrics across rows for one position, one subplot each (their units differ);
    several prompts: a line each, or with ``band=True`` the mean and a min-max band."""
    if isinstance(metrics, str):
        metrics = [metrics]
    p = result.pos_index(pos)
    chosen = _batches(result.token_ids.shape[0], batch)
    figure = make_subplots(rows=len(metrics), cols=1, shared_xaxes=True, subplot_titles=list(metrics))
    for i, metric in enumerate(metrics):
        values = metric_values(result, metric)[:, chosen, p]
        if is_rank_metric(metric):
            values = values.masked_fill(values < 1, math.nan)
        _lines(figure, list(result.labels), values, metric, _COLOURS[i % len(_COLOURS)], chosen, band=band,
               row=i + 1, subplots=True, unified=False)
        if is_rank_metric(metric):
            style.log_rank_axis(figure, float(torch.nan_to_num(values, nan=1.0).max()), row=i + 1, col=1)
    style.finish(figure, f"across rows at {_at(result, result.positions[p], chosen)}")
    figure.update_layout(height=220 + 220 * len(metrics))
    figure.update_xaxes(type="category", showgrid=True, gridcolor=style.GRID)
    figure.update_yaxes(showgrid=True, gridcolor=style.GRID)
    return figure


def logit_diff_trajectory(diff, pos: int = -1, batch: Union[None, int, Sequence[int]] = None, *,
                          band: bool = False) -> go.Figure:
    """A ``LogitDiff`` across rows at prompt position ``pos`` (negative: counted from the last decoded
    position); several prompts: a line each, or with ``band=True`` the mean with a min-max band."""
    positions = list(diff.positions)
    if pos >= 0 and pos not in positions:
        raise LensIndexError(f"position {pos} was not decoded; decoded positions are {positions}")
    if pos < 0 and not -len(positions) <= pos:
        raise LensIndexError(f"position {pos} is out of range for {len(positions)} decoded positions")
    seq_pos = pos if pos >= 0 else positions[pos]
    chosen = _batches(diff.values.shape[1], batch)
    values = diff.values[:, chosen, positions.index(seq_pos)]
    figure = go.Figure()
    name = f"logit[{' / '.join(map(display_token, diff.target_names))}] - logit[{' / '.join(map(display_token, diff.distractor_names))}]"
    _lines(figure, list(diff.labels), values, name, _COLOURS[0], chosen, band=band)
    figure.add_hline(y=0, line={"color": "#888888", "dash": "dot"})
    style.finish(figure, f"logit difference across rows at {style.position_label(None, seq_pos)}")
    figure.update_layout(xaxis_title="residual stream row", yaxis_title="logit difference", hovermode="x unified")
    figure.update_xaxes(type="category", showgrid=True, gridcolor=style.GRID)
    figure.update_yaxes(showgrid=True, gridcolor=style.GRID)
    return figure


# --- lens comparison ------------------------------------------------------------------------------------

COMPARISON_COLUMNS = ("lens", "row", "kl", "cross_entropy", "perplexity")


def lens_comparison_figure(frame, metrics: Sequence[str] = ("kl", "cross_entropy")) -> go.Figure:
    """Per-row KL to the final row and cross-entropy of several lenses (logit lens, tuned lens, ...).

    ``frame``: a pandas DataFrame with columns lens, row, kl, cross_entropy, perplexity (one line per lens and
    row), as ``evaluate_lenses(...).to_dataframe()`` returns. Rows keep their order of first appearance; one subplot per metric.
    """
    missing = [c for c in ("lens", "row", *metrics) if c not in frame.columns]
    if missing:
        raise LensValueError(f"the frame lacks column(s) {missing}; expected columns {list(COMPARISON_COLUMNS)}")
    titles = {"kl": "KL(final || lens) (nats)", "cross_entropy": "cross-entropy (nats)", "perplexity": "perplexity"}
    figure = make_subplots(rows=1, cols=len(metrics), subplot_titles=[titles.get(m, m) for m in metrics])
    order = list(dict.fromkeys(frame["row"].tolist()))
    for i, lens in enumerate(dict.fromkeys(frame["lens"].tolist())):
        part = frame[frame["lens"] == lens].set_index("row").reindex(order)
        for j, metric in enumerate(metrics):
            name = html.escape(str(lens), quote=False)
            figure.add_trace(go.Scatter(
                x=order, y=part[metric].tolist(), mode="lines+markers", name=name,
                legendgroup=str(lens), showlegend=j == 0, line={"color": _COLOURS[i % len(_COLOURS)]},
                hovertemplate=f"{_hover_name(name)}<br>%{{x}}: {titles.get(metric, metric)} %{{y:.4g}}<extra></extra>",
            ), row=1, col=j + 1)
            figure.update_yaxes(type="log" if metric == "perplexity" else "linear", row=1, col=j + 1)
    figure.update_xaxes(type="category", title_text="residual stream row", showgrid=True, gridcolor=style.GRID)
    figure.update_yaxes(showgrid=True, gridcolor=style.GRID)
    style.finish(figure, "lenses compared, per row")
    figure.update_layout(width=520 * len(metrics) + 160, height=460)
    return figure


# --- report -----------------------------------------------------------------------------------------------


def html_report(
    result: LensResult,
    path: Union[str, Path],
    metrics: Optional[Sequence[str]] = None,
    batch: int = 0,
    title: str = "Logit lens",
    *,
    overwrite: bool = False,
    plotly: str = "inline",
) -> Path:
    """Write one HTML file with a heatmap per metric, stacked, and return its path.

    plotly.js is inlined once by default (about 4.5 MB) so the file opens offline and can be copied off a
    cluster as is; ``plotly="cdn"`` links it from plotly's CDN instead (a file of tens of KB that needs the
    network to draw).

    Args:
        result: the lens to draw.
        path: the HTML file to write.
        metrics: one heatmap per name of ``plot.available_metrics``; default ``DEFAULT_REPORT_METRICS`` plus
            the rank of each target.
        batch: the prompt of a batch to draw.
        title: the page's title.
        overwrite: replace an existing file (default: refuse it).
        plotly: ``"inline"`` (offline) or ``"cdn"``.

    Returns:
        ``path``, written atomically (``lens_plugins.files``): an interrupted write leaves an old file whole.

    Raises:
        LensValueError: ``path`` exists and ``overwrite`` is false (or cannot be written); an unknown metric, an empty ``metrics`` or an unknown ``plotly``.
    """
    check_file(path, overwrite=overwrite)
    check_plotly(plotly)
    if metrics is None:
        metrics = list(DEFAULT_REPORT_METRICS) + [f"rank[{name}]" for name in result.target_names]
    if isinstance(metrics, str):
        metrics = [metrics]
    if not metrics:
        raise LensValueError("metrics is empty: name at least one, e.g. metrics=['prob']")
    figures = [lens_heatmap(result, metric, batch) for metric in metrics]  # validate all before writing
    prompt = "".join(result.str_tokens(batch))
    final = result.top_tokens(result.positions[-1], batch)[result.labels[-1]][0]
    # <bdi>: a prompt in or with right-to-left script renders in its own order, not mixed into the page's.
    intro = (f"<p>Prompt: <bdi><code>{html.escape(prompt)}</code></bdi></p>\n<p>Rows {html.escape(result.labels[0])} (bottom) .. "
             f"{html.escape(result.labels[-1])} (top); at the last decoded position the model predicts "
             f"<code>{display_token(final[0])}</code> with p = {final[1]:.3f}.</p>")
    with atomic_write(path) as staging:
        write_page(staging, title, intro, list(zip(metrics, figures)), plotly=plotly)
    return Path(path)


PLOTLY_JS = ("inline", "cdn")


def check_plotly(plotly: str) -> None:
    """Refuse a ``plotly=`` other than ``"inline"`` (offline, ~4.5 MB) or ``"cdn"`` (a link to plotly's CDN)."""
    if plotly not in PLOTLY_JS:
        raise LensValueError(f"plotly={plotly!r}: choose 'inline' (plotly.js in the file, works offline) or 'cdn' "
                             "(a link to plotly's CDN: a small file that needs the network to draw)")


def write_page(path: Union[str, Path], title: str, intro: str, sections: Sequence[tuple[str, go.Figure]],
               plotly: str = "inline") -> Path:
    """One HTML page: a title, ``intro`` (HTML, already escaped), a table of contents and a section per
    ``(heading, figure)``, with plotly.js inlined once (about 4.5 MB, so that it opens offline) or, with
    ``plotly="cdn"``, loaded from plotly's CDN."""
    check_plotly(plotly)
    parts = []
    for i, (heading, fig) in enumerate(sections):
        include = (True if plotly == "inline" else "cdn") if i == 0 else False
        body = fig.to_html(full_html=False, include_plotlyjs=include, div_id=f"figure-{i}")
        parts.append(f'<section id="section-{i}"><h2>{html.escape(heading)}</h2>\n{body}\n</section>')
    nav = " · ".join(f'<a href="#section-{i}">{html.escape(h)}</a>' for i, (h, _) in enumerate(sections))
    document = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body {{ font-family: sans-serif; margin: 1.5em; }} section {{ overflow-x: auto; }}
code {{ background: #f3f3f3; padding: 0 .2em; white-space: pre-wrap; }}</style></head>
<body>
<h1>{html.escape(title)}</h1>
{intro}
<nav>{nav}</nav>
{chr(10).join(parts)}
</body>
</html>
"""
    path = Path(path)
    path.write_text(document, encoding="utf-8")
    return path

__all__ = ["MAX_TEXT_POSITIONS", "DEFAULT_REPORT_METRICS", "available_metrics", "check_metric", "metric_values",
    "is_rank_metric", "position_labels", "row_selection", "position_selection", "final_top1", "next_tokens",
    "top_axis_labels", "agreement_cells", "outlined_cells", "lens_heatmap", "heatmap_values", "trajectory_figure",
    "tracked_figure",
    "metric_trajectory", "logit_diff_trajectory", "COMPARISON_COLUMNS", "lens_comparison_figure", "html_report",
    "write_page", "display_token", "visible_text", "CLIPPED_METRICS", "LOG_FLOOR", "robust_max"]
