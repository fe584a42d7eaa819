"""Plotly views of a ``LensResult``: a rows x positions heatmap and a standalone HTML report.

The layout follows nostalgebraist's logit-lens plots: the embedding row at the bottom, the model's own
output at the top, one column per decoded prompt position, each cell labelled with the lens's top-1
token. Reports inline plotly.js, because the clusters these run on often have no internet for a CDN.
"""

import html
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import plotly.graph_objects as go
import torch
from torch import Tensor

from lens_plugins.core.reductions import METRIC_STYLES
from lens_plugins.result import METRICS, LensResult

# Above this many positions a cell is too narrow for its token, so the cells carry colour only
# (the hover still names every top-k token).
MAX_TEXT_POSITIONS = 64
_CELL_CHARS = 7  # a cell shows at most this many characters of its token
_CELL_PX = 52  # width of one position when cells carry text
_ROW_PX = 22

# Colour scale and axis title per metric, from the reductions table. Dark means "confident" for prob and
# rank, and "far from the model's own answer" for entropy and divergences.
_STYLE = METRIC_STYLES
_TARGET_METRIC = re.compile(r"(rank|logprob)\[(.+)\]", re.DOTALL)

DEFAULT_REPORT_METRICS = ("prob", "entropy", "kl_final_row", "final_top1_rank", "next_token_rank")


def available_metrics(target_names: Sequence[str] = ()) -> list[str]:
    """Every metric a result with these targets can be coloured by: ``METRICS`` plus ``rank[t]`` and
    ``logprob[t]`` for each target ``t`` (the same names as ``to_dataframe``'s columns). Taking names
    rather than a result lets the CLI check ``--metric`` before it spends seconds loading a model."""
    per_target = [f"{kind}[{name}]" for name in target_names for kind in ("rank", "logprob")]
    return list(METRICS) + per_target


def check_metric(metric: str, target_names: Sequence[str] = ()) -> None:
    if metric not in available_metrics(target_names):
        raise ValueError(f"unknown metric {metric!r}; choose one of {available_metrics(target_names)}"
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


def display_token(token: str) -> str:
    """A token as plotly text: whitespace made visible (a leading space is what separates ' Paris' from
    'Paris') and HTML-escaped, since plotly renders text as pseudo-HTML and '<|im_start|>' would vanish."""
    visible = token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
    return html.escape(visible, quote=False)


def position_labels(result: LensResult, batch: int = 0) -> list[str]:
    """x-axis labels: the input token at each decoded position, with its index in the prompt."""
    tokens = result.str_tokens(batch)
    return [f"{display_token(tokens[p])} [{p}]" for p in result.positions]


def _check_batch(result: LensResult, batch: int) -> None:
    n = result.token_ids.shape[0]
    if not 0 <= batch < n:
        raise IndexError(f"batch {batch} is out of range: this result holds {n} prompt(s), batch 0..{n - 1}")


def _short(token: str) -> str:
    return token if len(token) <= _CELL_CHARS else token[: _CELL_CHARS - 1] + "…"


def _format(metric: str, value: float) -> str:
    if math.isnan(value) or (is_rank_metric(metric) and value < 0):
        return "n/a (no next token)"
    return f"{int(value)}" if is_rank_metric(metric) else f"{value:.3g}"


def _hover(result: LensResult, metric: str, values: Tensor, batch: int) -> list[list[str]]:
    """Per cell: row, position, metric value, the top-k with probabilities and the actual next token."""
    tokens = result.str_tokens(batch)
    ids = result.top_ids[:, batch].tolist()
    probs = result.top_probs[:, batch].tolist()
    hover = []
    for r, label in enumerate(result.labels):
        line = []
        for p, position in enumerate(result.positions):
            nxt = tokens[position + 1] if position + 1 < len(tokens) else None
            top = "<br>".join(
                f"  {html.escape(repr(result.token(i)), quote=False)}  {q:.3f}" for i, q in zip(ids[r][p], probs[r][p])
            )
            line.append(
                f"<b>{label}</b> at {display_token(tokens[position])} [{position}]<br>"
                f"{metric}: {_format(metric, float(values[r, p]))}<br>"
                f"top-{len(ids[r][p])}:<br>{top}<br>"
                f"next token: {html.escape(repr(nxt), quote=False) if nxt is not None else '(end of prompt)'}"
            )
        hover.append(line)
    return hover


def lens_heatmap(result: LensResult, metric: str = "prob", batch: int = 0) -> go.Figure:
    """A rows x positions heatmap of ``metric`` for prompt ``batch``, each cell labelled with its top-1.

    Rows run from the embedding (bottom) to the final residual stream (top), so reading upwards follows
    the forward pass. Rank metrics are coloured on a log10 scale (ranks span 1 to the vocabulary size;
    on a linear scale every rank under ~1000 looks the same); their ``z`` is ``log10(rank)``, NaN where
    no rank exists. Metric names are those of ``available_metrics(result)``.
    """
    _check_batch(result, batch)
    values = metric_values(result, metric)[:, batch].cpu()
    rank = is_rank_metric(metric)
    if rank:
        z = torch.where(values >= 1, values.clamp(min=1).log10(), torch.full_like(values, math.nan))
    else:
        z = values
    scale, title = _STYLE.get(metric, ("Blues_r", metric) if rank else ("Blues", metric))
    colorbar: dict = {"title": {"text": title + (" (log scale)" if rank else ""), "side": "right"}}
    if rank:
        top = max(1.0, float(torch.nan_to_num(z, nan=0.0).max()))
        ticks = list(range(int(math.ceil(top)) + 1))
        colorbar.update(tickvals=ticks, ticktext=[f"{10 ** t:,}" for t in ticks])

    n_pos = len(result.positions)
    with_text = n_pos <= MAX_TEXT_POSITIONS
    top1 = [[_short(display_token(result.token(i))) for i in row] for row in result.top_ids[:, batch, :, 0].tolist()]
    heatmap = go.Heatmap(
        z=z.tolist(),
        x=position_labels(result, batch),
        y=list(result.labels),
        colorscale=scale,
        zmin=0.0 if metric == "prob" else None,
        zmax=1.0 if metric == "prob" else None,
        colorbar=colorbar,
        text=top1,
        texttemplate="%{text}" if with_text else None,
        textfont={"size": 10},
        customdata=_hover(result, metric, values, batch),
        hovertemplate="%{customdata}<extra></extra>",
        xgap=1,
        ygap=1,
    )
    fig = go.Figure(heatmap)
    cell = _CELL_PX if with_text else max(8, min(_CELL_PX, 2400 // n_pos))
    fig.update_layout(
        title={"text": f"logit lens: {title}" + ("" if with_text else " (hover for tokens)")},
        width=220 + cell * n_pos,
        height=160 + _ROW_PX * len(result.labels),
        margin={"l": 80, "r": 40, "t": 60, "b": 100},
        plot_bgcolor="white",
    )
    fig.update_xaxes(type="category", title_text="input token [position]", tickangle=-45 if n_pos > 8 else 0)
    fig.update_yaxes(type="category", title_text="residual stream row")
    return fig


def html_report(
    result: LensResult,
    path: Union[str, Path],
    metrics: Optional[Sequence[str]] = None,
    batch: int = 0,
    title: str = "Logit lens",
) -> Path:
    """Write one self-contained HTML file with a heatmap per metric, stacked, and return its path.

    ``metrics`` defaults to ``DEFAULT_REPORT_METRICS`` plus the rank of each target. plotly.js is inlined
    once (about 4.5 MB) so the file opens offline and can be copied off a cluster as is.
    """
    if metrics is None:
        metrics = list(DEFAULT_REPORT_METRICS) + [f"rank[{name}]" for name in result.target_names]
    if isinstance(metrics, str):
        metrics = [metrics]
    if not metrics:
        raise ValueError("metrics is empty: name at least one, e.g. metrics=['prob']")
    figures = [lens_heatmap(result, metric, batch) for metric in metrics]  # validate all before writing
    prompt = "".join(result.str_tokens(batch))
    final = result.top_tokens(result.positions[-1], batch)[result.labels[-1]][0]
    sections = []
    for i, (metric, fig) in enumerate(zip(metrics, figures)):
        body = fig.to_html(full_html=False, include_plotlyjs=i == 0, div_id=f"lens-{i}")
        sections.append(f'<section id="metric-{i}"><h2>{html.escape(metric)}</h2>\n{body}\n</section>')
    nav = " · ".join(f'<a href="#metric-{i}">{html.escape(m)}</a>' for i, m in enumerate(metrics))
    document = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body {{ font-family: sans-serif; margin: 1.5em; }} section {{ overflow-x: auto; }}
code {{ background: #f3f3f3; padding: 0 .2em; }}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Prompt: <code>{html.escape(prompt)}</code></p>
<p>Rows {html.escape(result.labels[0])} (bottom) .. {html.escape(result.labels[-1])} (top); at the last decoded
position the model predicts <code>{html.escape(repr(final[0]))}</code> with p = {final[1]:.3f}.</p>
<nav>{nav}</nav>
{chr(10).join(sections)}
</body>
</html>
"""
    path = Path(path)
    path.write_text(document, encoding="utf-8")
    return path
