"""The lens over an image's patches: one grid per image beside the text positions, one lens row at a time.

A vision-language prompt is text around runs of image tokens (``lens_plugins.methods.vision``). A heatmap over
positions would spread an image's patches along a line; here each image run is drawn as its patch grid (rows x
columns, as the vision tower saw it), each cell coloured by ``metric`` at one lens row and labelled with the
lens's top-1 token there, and a slider walks the rows from the embedding to the model's output. Beside the
grids, the text positions are the usual rows x positions heatmap, on the same colour scale (the shared one of
``core.reductions.METRIC_STYLES``, as every lens figure). The image itself, when given, is shown first, so a
patch can be found on it. Like every figure it takes a result, never a model.
"""

from collections.abc import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from lens_plugins.core.errors import LensIndexError, LensValueError
from lens_plugins.core.reductions import METRIC_STYLES
from lens_plugins.methods.result import LensResult
from lens_plugins.methods.vision import ImageGrid, patch_values
from lens_plugins.plot import style
from lens_plugins.plot.figures import LOG_FLOOR, _colour_values, is_rank_metric, metric_values
from lens_plugins.tokens import display_token

_CELL_CHARS = 6


def _short(token: str) -> str:
    return token if len(token) <= _CELL_CHARS else token[: _CELL_CHARS - 1] + "…"


def image_lens_figure(
    result: LensResult,
    grids: Sequence[ImageGrid],
    *,
    metric: str = "prob",
    row: int = -1,
    batch: int = 0,
    image=None,
) -> go.Figure:
    """The lens over ``batch``'s image patches (one grid per image run of ``grids``) at lens row ``row``, with
    a slider over every row, beside the rows x text-positions heatmap; ``image`` (a PIL image or an
    ``[H, W, 3]`` array), if given, is drawn first. Cells show the lens's top-1 token; hover names the patch,
    its position and the value. Rank metrics are coloured by log10(rank), as in ``lens_heatmap``."""
    if not 0 <= batch < result.token_ids.shape[0]:
        raise LensIndexError(f"batch {batch} is out of range: this result holds {result.token_ids.shape[0]} prompt(s)")
    mine = [g for g in grids if g.batch == batch]
    if not mine:
        raise LensValueError(f"no image run belongs to prompt {batch}: pass lp.vision.image_grids(model, inputs) "
                             "of the inputs this result ran")
    n_rows = len(result.labels)
    start = row % n_rows if -n_rows <= row < n_rows else None
    if start is None:
        raise LensIndexError(f"row {row} is out of range for {n_rows} rows")
    rank = is_rank_metric(metric)
    values = _colour_values(metric_values(result, metric)[:, batch].cpu().float(), rank, False, LOG_FLOOR)  # [row, pos]
    top1 = result.top_ids[:, batch, :, 0] if result.top_ids is not None else None
    direction, title = METRIC_STYLES.get(metric, ("sequential_r", metric) if rank else ("sequential", metric))
    patches = {p for g in mine for p in g.positions}
    text_idx = [i for i, p in enumerate(result.positions) if p not in patches]

    panels = (["image"] if image is not None else []) + [f"image {g.image}" for g in mine] + (["text"] if text_idx else [])
    widths = [1.0] * (len(panels) - (1 if text_idx else 0)) + ([max(1.0, 0.25 * len(text_idx))] if text_idx else [])
    figure = make_subplots(rows=1, cols=len(panels), column_widths=widths, horizontal_spacing=0.06,
                           subplot_titles=[("the image" if p == "image" else f"{p}: patches" if p != "text"
                                            else "text positions") for p in panels])
    col = 1
    if image is not None:
        figure.add_trace(go.Image(z=_as_array(image)), row=1, col=col)
        figure.update_xaxes(visible=False, row=1, col=col)
        figure.update_yaxes(visible=False, row=1, col=col)
        col += 1
    grid_traces, states = [], []
    for grid in mine:
        grid_values = patch_values(values, result.positions, grid)  # [row, rows, cols]
        tokens = None
        if top1 is not None:
            tokens = patch_values(top1.float(), result.positions, grid)
        labels = [[f"patch {r},{c}" for c in range(grid_values.shape[2])] for r in range(grid_values.shape[1])]
        per_row = []
        for r in range(n_rows):
            z = grid_values[r]
            text = [["" if tokens is None or torch.isnan(tokens[r, i, j]) else
                     _short(display_token(result.token(int(tokens[r, i, j])))) for j in range(z.shape[1])]
                    for i in range(z.shape[0])]
            per_row.append((z.tolist(), text))
        states.append(per_row)
        grid_traces.append(len(figure.data))
        figure.add_trace(go.Heatmap(
            z=per_row[start][0], text=per_row[start][1], texttemplate="%{text}", textfont={"size": 9},
            customdata=labels, coloraxis="coloraxis", xgap=1, ygap=1, name=f"image {grid.image}",
            hovertemplate="%{customdata}: %{z:.3g} (top-1 %{text})<extra></extra>",
        ), row=1, col=col)
        figure.update_yaxes(autorange="reversed", scaleanchor=f"x{col}", showticklabels=False, row=1, col=col)
        figure.update_xaxes(showticklabels=False, row=1, col=col)
        col += 1
    if text_idx:
        tokens = result.str_tokens(batch)
        z = values[:, text_idx]
        text = None if top1 is None else [[_short(display_token(result.token(int(top1[r, i])))) for i in text_idx]
                                          for r in range(n_rows)]
        figure.add_trace(go.Heatmap(
            z=z.tolist(), text=text, texttemplate="%{text}", textfont={"size": 9}, coloraxis="coloraxis",
            x=[f"{display_token(tokens[result.positions[i]])} [{result.positions[i]}]" for i in text_idx],
            y=result.labels, xgap=1, ygap=1, name="text",
            hovertemplate="%{y} at %{x}: %{z:.3g} (top-1 %{text})<extra></extra>",
        ), row=1, col=col)
        figure.update_xaxes(tickangle=-45, row=1, col=col)
    steps = [dict(method="restyle", label=result.labels[r],
                  args=[{"z": [states[g][r][0] for g in range(len(mine))],
                         "text": [states[g][r][1] for g in range(len(mine))]}, grid_traces])
             for r in range(n_rows)]
    figure.update_layout(
        sliders=[dict(active=start, steps=steps, currentvalue={"prefix": "lens row (patch grids): "},
                      pad={"t": 60})],
        coloraxis={"colorscale": style.SEQUENTIAL, "reversescale": direction == "sequential_r", "colorbar": {"title": {"text": title + (" (log10)" if rank else "")}},
                   "cmin": 0.0 if metric == "prob" else None, "cmax": 1.0 if metric == "prob" else None},
        title={"text": f"logit lens over the image patches: {title} and top-1 token at one row (slider) "
                       "beside the text positions"},
        width=max(720, 260 * len(panels) + 30 * len(text_idx)), height=520, plot_bgcolor="white",
    )
    return figure


def grid_values(figure: go.Figure, image: int = 0) -> list[list[float | None]]:
    """The ``z`` of the ``image``-th patch grid as drawn (for tests and callers that read a figure back)."""
    heatmaps = [t for t in figure.data if isinstance(t, go.Heatmap) and t.name != "text"]
    return [list(line) for line in heatmaps[image].z]


def _as_array(image):
    import numpy as np

    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise LensValueError(f"image= is an RGB picture ([H, W, 3] or a PIL image); got shape {array.shape}")
    return array


__all__ = ["grid_values", "image_lens_figure"]
