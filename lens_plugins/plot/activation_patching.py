"""Plotly views of a ``PatchingResult``: the sweep's grid (patched row x position, with bootstrap intervals over
the prompt set in the hover) and the affected cone of one patched cell (how the lens's metric moved at every
later row and position). Both read only the result, so what they show is what ``mean``, ``interval`` and
``cone_change`` return.
"""

import plotly.graph_objects as go

from lens_plugins.core.errors import LensValueError
from lens_plugins.tokens import display_token

_AXIS = {"logit_diff": "logit difference", "prob": "P(answer)", "rank": "rank of answer"}


def _title(result) -> str:
    answer = display_token(result.vocab_strings[result.answer_ids[0]])
    if result.metric == "logit_diff":
        foil = display_token(result.vocab_strings[result.foil_ids[0]])
        what = f"logit({answer}) - logit({foil})"
    else:
        what = f"{_AXIS[result.metric]} {answer}"
    prompts = f"{result.n_prompts} prompt pair{'s' if result.n_prompts != 1 else ''}"
    return f"{what} at position {result.metric_position}, {prompts}"


def _columns(result, positions) -> list[str]:
    tokens = result.target_tokens(0)
    return [f"{p}: {display_token(tokens[p])}" for p in positions]


def patching_figure(result, normalized: bool = True, confidence: float = 0.95, n_resamples: int = 1000,
                    seed: int = 0) -> go.Figure:
    """Heatmap of the mean effect per patched cell (``normalized``: 0 = the target's own metric, 1 = the source's),
    rows bottom-up in stream order; the hover gives the bootstrap interval over prompts (``result.interval``)."""
    if normalized and bool(((result.source_values - result.target_values) == 0).any()):
        raise LensValueError("a prompt pair has the same metric on source and target, so the normalised effect "
                             "divides by zero: plot(normalized=False)")
    interval = result.interval(confidence, n_resamples, seed, normalized)
    columns = _columns(result, result.positions)
    hover = [[f"row {label}<br>pos {column}<br>mean {interval.mean[r, i]:.3f}"
              + (f"<br>{confidence:.0%} CI [{interval.low[r, i]:.3f}, {interval.high[r, i]:.3f}]"
                 if result.n_prompts > 1 else "")
              for i, column in enumerate(columns)] for r, label in enumerate(result.labels)]
    figure = go.Figure(go.Heatmap(
        z=interval.mean.tolist(), x=columns, y=result.labels, text=hover, hoverinfo="text",
        colorscale="RdBu", zmid=0 if not normalized else 0.5, reversescale=True,
        colorbar={"title": "restored" if normalized else _AXIS[result.metric]},
    ))
    figure.update_layout(
        title=f"Activation patching: {_title(result)}" + ("<br><sup>(patched - target) / (source - target)</sup>"
                                                          if normalized else ""),
        xaxis_title="patched position (target token)", yaxis_title="patched row", plot_bgcolor="white",
        height=max(360, 16 * len(result.labels) + 160), width=max(520, 70 * len(columns) + 220),
    )
    return figure


def cone_figure(result, row, pos) -> go.Figure:
    """Heatmap of ``result.cone_change(row, pos)``: the change of the metric read through the lens at every row
    and position of the target when cell ``(row, pos)`` is patched, the cell marked; cells before it cannot
    see the patch and stay 0."""
    change = result.cone_change(row, pos)
    r, i = result._cell(row, pos)
    seq = change.shape[1]
    columns = _columns(result, range(seq))
    figure = go.Figure(go.Heatmap(
        z=change.tolist(), x=columns, y=result.read_labels, colorscale="RdBu", zmid=0, reversescale=True,
        colorbar={"title": f"change in {_AXIS[result.metric]}"},
        hovertemplate="row %{y}<br>pos %{x}<br>change %{z:.3f}<extra></extra>",
    ))
    figure.add_trace(go.Scatter(x=[columns[result.positions[i]]], y=[result.labels[r]], mode="markers",
                                marker={"symbol": "x", "size": 12, "color": "black"}, name="patched cell"))
    figure.update_layout(
        title=f"Affected cone of a patch at ({result.labels[r]}, pos {result.positions[i]}), read through the "
              f"{result.lens_name or 'logit lens'}<br><sup>{_title(result)}; mean change vs the unpatched target</sup>",
        xaxis_title="position (target token)", yaxis_title="row", plot_bgcolor="white",
        height=max(420, 14 * len(result.read_labels) + 160), width=max(560, 44 * seq + 240),
        legend={"orientation": "h", "y": -0.2},
    )
    return figure


__all__ = ["patching_figure", "cone_figure"]
