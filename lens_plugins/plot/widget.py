"""An explorable view of a ``LensResult``: click a cell for its top-k, pin tokens to see their trajectories
across rows, light or dark, save the view's data as JSON. The same plain-JS module (``widget.js``, no library,
no network) runs as an anywidget in a notebook (``LensWidget``) and inside a static HTML page
(``widget_html`` / ``write_widget``; ``methods.report.write_report`` embeds it), so the exported report has the
same interactions offline.

``view_data`` is everything the view draws (token strings as ``tokens.visible_text`` shows them, and raw for the
saved JSON), computed once here: per cell the top-k (ids and probabilities), per
position the trajectories it can draw (the tokens worth tracking of ``auto_tokens=N`` and the targets, at every
row; any other top-k token where it was in the top-k, marked partial) and the default pins (the tracked
tokens, else the final top-1).
"""

import html
import json
import math
from pathlib import Path
from typing import Union

from lens_plugins.core.errors import LensValueError
from lens_plugins.files import atomic_write, check_file
from lens_plugins.tokens import visible_text

ESM = Path(__file__).with_name("widget.js")


def _prob(logprob: float):
    return None if math.isnan(logprob) else round(math.exp(logprob), 6)


def view_data(result, batch: int = 0, title: str = "") -> dict:
    """The JSON-able data the view draws (see the module docstring); ``batch`` picks the prompt."""
    if result.top_ids is None:
        raise LensValueError("the explorable view lists each cell's top-k: compute the lens with 'top_k' in "
                             "reductions=[...] (it is in the default)")
    top_ids, top_probs = result.top_ids[:, batch], result.top_logprobs[:, batch].exp()
    n_rows, n_pos, k = top_ids.shape
    top = [[[[int(top_ids[r, p, j]), round(float(top_probs[r, p, j]), 6)] for j in range(k)] for p in range(n_pos)]
           for r in range(n_rows)]
    tracks, pins = [], []
    for p, position in enumerate(result.positions):
        found = {}
        for r in range(n_rows):  # any top-k token: its probability where it was in the top-k
            for token_id, prob in top[r][p]:
                entry = found.setdefault(token_id, {"probs": [None] * n_rows, "reason": None, "partial": True})
                entry["probs"][r] = prob
        for j, token_id in enumerate(result.target_ids.tolist()):
            found[token_id] = {"probs": [_prob(float(v)) for v in result.target_logprobs[:, batch, p, j]],
                               "reason": "target", "partial": False}
        chosen = []
        if result.auto_ids is not None:
            for token in result.tracked(position, batch):
                found[token["id"]] = {"probs": [round(v, 6) for v in token["probs"]], "reason": token["reason"],
                                      "partial": False}
                chosen.append(token["id"])
        if not chosen:
            chosen = [top[-1][p][0][0]]
        tracks.append({str(token_id): entry for token_id, entry in found.items()})
        pins.append(chosen)
    ids = {i for row in top for cell in row for i, _ in cell} | set(result.target_ids.tolist())
    tokens = result.str_tokens(batch)
    return {
        "title": title, "labels": list(result.labels), "positions": list(result.positions),
        "tokens": [visible_text(tokens[p]) for p in result.positions], "top": top, "tracks": tracks, "pins": pins,
        "vocab": {str(i): result.token(i) for i in sorted(ids)},
        "shown": {str(i): visible_text(result.token(i)) for i in sorted(ids)},
    }


def _initial(data: dict) -> dict:
    """The view's starting state: the output row at the last position, no pins of the reader's own."""
    return {"data": data, "selected": [len(data["labels"]) - 1, len(data["positions"]) - 1], "pinned": [],
            "theme": "light"}


def widget_html(result, batch: int = 0, title: str = "", element_id: str = "lens-widget") -> str:
    """An HTML fragment holding the view: a container, the data as JSON and the module run on a local model.
    Self-contained (no CDN, no library): paste it into any page."""
    state = json.dumps(_initial(view_data(result, batch, title)))
    source = ESM.read_text(encoding="utf-8").replace("export default { render, localModel };", "")
    safe = state.replace("</", "<\\/")  # a token "</script>" must not end the script element
    return (f'<div id="{html.escape(element_id)}"></div>\n'
            f'<script type="application/json" id="{html.escape(element_id)}-data">{safe}</script>\n'
            f"<script type=\"module\">\n{source}\n"
            f"const state = JSON.parse(document.getElementById({json.dumps(element_id + '-data')}).textContent);\n"
            f"render({{ model: localModel(state), el: document.getElementById({json.dumps(element_id)}) }});\n"
            "</script>\n")


def write_widget(path: Union[str, Path], result, batch: int = 0, title: str = "Logit lens explorer", *,
                 overwrite: bool = False) -> Path:
    """A standalone HTML page of the view (works offline, opens from disk)."""
    check_file(path, overwrite=overwrite)
    document = (f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"</head>\n<body>\n<h1>{html.escape(title)}</h1>\n{widget_html(result, batch, title)}</body>\n</html>\n")
    with atomic_write(path) as staging:
        Path(staging).write_text(document, encoding="utf-8")
    return Path(path)


def LensWidget(result, batch: int = 0, title: str = "", theme: str = "light"):
    """The view as a notebook widget (anywidget): display it as the last expression of a cell. Its traits
    ``selected`` ([row, pos] indices), ``pinned`` (token ids) and ``theme`` follow the reader's clicks and can
    be set from Python; ``view_json()`` / ``save_json(path)`` give the data of the current view."""
    try:
        import anywidget
        import traitlets
    except ImportError:
        raise LensValueError("the notebook widget needs anywidget: pip install 'lens_plugins[notebooks]' (or "
                             "write_widget(path, result) for a standalone HTML page)") from None
    if theme not in ("light", "dark"):
        raise LensValueError(f"theme must be 'light' or 'dark', got {theme!r}")

    class _LensWidget(anywidget.AnyWidget):
        _esm = ESM
        data = traitlets.Dict().tag(sync=True)
        selected = traitlets.List().tag(sync=True)
        pinned = traitlets.List().tag(sync=True)
        theme = traitlets.Unicode("light").tag(sync=True)

        def view_json(self) -> dict:
            return view_json(self.data, self.selected, self.pinned, self.theme)

        def save_json(self, path: Union[str, Path], *, overwrite: bool = False) -> Path:
            check_file(path, overwrite=overwrite)
            with atomic_write(path) as staging:
                Path(staging).write_text(json.dumps(self.view_json(), indent=1), encoding="utf-8")
            return Path(path)

    state = _initial(view_data(result, batch, title))
    state["theme"] = theme
    return _LensWidget(**state)


def view_json(data: dict, selected: list, pinned: list, theme: str) -> dict:
    """The data of one view, as the page's "save view JSON" button writes it: the selected cell, its top-k, and
    the trajectories drawn (the position's default pins, then the reader's)."""
    r, p = selected
    shown = list(dict.fromkeys(list(data["pins"][p]) + list(pinned)))
    vocab = data["vocab"]
    return {
        "selected": {"row": data["labels"][r], "position": data["positions"][p]}, "theme": theme,
        "top": [{"token": vocab[str(i)], "id": i, "prob": prob} for i, prob in data["top"][r][p]],
        "trajectories": [{"token": vocab[str(i)], "id": i, **data["tracks"][p][str(i)]} for i in shown
                         if str(i) in data["tracks"][p]],
        "labels": data["labels"],
    }

__all__ = ["ESM", "view_data", "widget_html", "write_widget", "LensWidget", "view_json"]
