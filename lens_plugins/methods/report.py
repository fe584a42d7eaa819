"""The one-page report of a prompt: what the model thinks at each layer, why, and where it looks.

``write_report`` takes result objects (a ``LensResult``, an ``Attribution``, an ``AttentionResult``) and writes
one self-contained HTML file; ``run_report`` computes them on a TransformerLens model from a single cached
forward pass: the lens heatmap, the final top-1 and the runner-up across rows, the tokens worth tracking
(``auto_tokens``: those that surfaced at an intermediate row and faded), the direct logit attribution
of the top-1 against the runner-up, and the attention of every layer and head.
"""

import html
from pathlib import Path
from typing import Optional, Union

from lens_plugins.core.defaults import TOP_K
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.request import single_token_id
from lens_plugins.files import atomic_write, check_file
from lens_plugins.plot.figures import check_plotly, lens_heatmap, tracked_figure, trajectory_figure, write_page
from lens_plugins.tokens import display_token


REPORT_AUTO_TOKENS = 5  # tokens tracked at the last position (``core.track``): the top-k's dot products, no vocabulary pass


def report_sections(lens, attribution=None, attention=None, batch: int = 0) -> list:
    """``(heading, figure)`` pairs of the report, in reading order."""
    sections = [("lens heatmap: P(top-1)", lens_heatmap(lens, "prob", batch))]
    if lens.target_names:
        sections.append(("the final answer and the runner-up across rows: probability",
                         trajectory_figure(lens, kind="prob", batch=batch)))
        sections.append(("... and their rank", trajectory_figure(lens, kind="rank", batch=batch)))
    if lens.auto_ids is not None:
        sections.append(("tokens worth tracking: the final top-1 and tokens that surfaced and faded",
                         tracked_figure(lens, "prob", lens.positions[-1], batch)))
    if attribution is not None:
        from lens_plugins.plot.attribution import attribution_bars, attribution_figure

        tokens = lens.str_tokens(batch)  # the attribution ran on the lens's prompt: its title names the token
        sections.append(("direct logit attribution: top components",
                         attribution_bars(attribution.view("component"), batch=batch, tokens=tokens)))
        sections.append(("direct logit attribution: every head", attribution_figure(attribution.view("head"), batch, tokens)))
    if attention is not None:
        from lens_plugins.plot.attention import model_view, sink_figure

        sections.append(("attention: every layer and head", model_view(attention, batch)))
        sections.append(("attention sinks", sink_figure(attention, batch)))
    return sections


def write_report(path: Union[str, Path], lens, attribution=None, attention=None, batch: int = 0,
                 title: str = "Logit lens report", *, overwrite: bool = False, plotly: str = "inline",
                 explore: bool = True) -> Path:
    """One HTML file of the given results (plotly.js inlined, so it works offline; ``plotly="cdn"`` links it
    instead). An existing file is replaced only with ``overwrite=True``, in one rename (an interrupted write
    leaves the old file whole). ``explore`` adds the explorable view of ``plot.widget`` (plain JS, offline):
    click a cell for its top-k, pin tokens to draw their trajectories."""
    check_file(path, overwrite=overwrite)
    check_plotly(plotly)
    sections = report_sections(lens, attribution, attention, batch)
    prompt = "".join(lens.str_tokens(batch))
    final = lens.top_tokens(lens.positions[-1], batch)[lens.labels[-1]]
    runner = f", then <code>{display_token(final[1][0])}</code> ({final[1][1]:.3f})" if len(final) > 1 else ""
    # <bdi>: right-to-left text in the prompt renders in its own order (the token list isolates each token).
    intro = (f"<p>Prompt: <bdi><code>{html.escape(prompt)}</code></bdi> ({lens.token_ids.shape[1]} tokens: "
             f"{' '.join(display_token(t) for t in lens.str_tokens(batch))})</p>\n"
             f"<p>At the last position the model predicts <code>{display_token(final[0][0])}</code> "
             f"(p = {final[0][1]:.3f}){runner}. Rows run from the embeddings ({html.escape(lens.labels[0])}) to the "
             f"model's output ({html.escape(lens.labels[-1])}).</p>")
    if explore and lens.top_ids is not None:
        from lens_plugins.plot.widget import widget_html

        intro += ('<section id="explore"><h2>explore: click a cell for its top-k, click a token to pin its '
                  f"trajectory</h2>\n{widget_html(lens, batch)}</section>\n")
    with atomic_write(path) as staging:
        write_page(staging, title, intro, sections, plotly=plotly)
    return Path(path)


def run_report(model, prompt: str, path: Union[str, Path], top_k: int = TOP_K, title: Optional[str] = None, *,
               overwrite: bool = False, prepend_bos: Optional[bool] = None, target=None, distractor=None,
               plotly: str = "inline") -> Path:
    """Run a TransformerLens model once on ``prompt``, caching what the lens, the attribution and the
    attention views read, and write the report.

    ``path`` is checked (and an existing file refused without ``overwrite``) before the model runs, and so is
    ``prompt``: one longer than the model's context is refused with the plain lens's error (``to_tokens`` would
    cut it to the context without a word).

    Args:
        model: a TransformerLens ``TransformerBridge`` or ``HookedTransformer``.
        prompt: the text to run.
        path: the HTML file to write.
        top_k: tokens listed per heatmap cell.
        title: the page's title (default: the prompt).
        overwrite: replace an existing file (default: refuse it).
        prepend_bos: ``run_logit_lens``'s: the report shows the ids the one-call forms of both backends run.
        target: the token whose logit the attribution explains (a single-token string or an id); default the
            model's top-1 at the last position.
        distractor: the token it is contrasted with; default the model's best token other than ``target``
            (the runner-up when ``target`` is the top-1).
        plotly: ``"inline"`` (offline, ~4.5 MB) or ``"cdn"``.

    Returns:
        ``path``.

    Raises:
        LensValueError: ``path`` exists and ``overwrite`` is false (or cannot be written); an empty or too long prompt, a target that is not one token, ``target == distractor``.
    """
    check_file(path, overwrite=overwrite)  # before the model runs, not after
    check_plotly(plotly)

    import torch

    from lens_plugins import transformer_lens as tl  # the report drives a backend: imported when it runs
    from lens_plugins.backends.transformer_lens.reader import tokenize

    tokens, _ = tokenize(model, prompt, None, prepend_bos)  # the plain lens's guards and tokenization
    names = list(dict.fromkeys(tl.hook_filter(model, attribution=True) + tl.attention_hook_filter(model)))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=names)
    vocab = logits.shape[-1]
    ranked = logits[0, -1].topk(3).indices.tolist()
    best = ranked[0] if target is None else single_token_id(model.tokenizer, target, vocab)
    if distractor is None:
        runner = next(token for token in ranked if token != best)
    else:
        runner = single_token_id(model.tokenizer, distractor, vocab)
    if runner == best:
        raise LensValueError(f"target and distractor are the same token ({best}): the contrast would be 0 everywhere; "
                             "name two different tokens")
    lens = tl.logit_lens(cache, tokens=tokens, top_k=top_k, targets=[best, runner], auto_tokens=REPORT_AUTO_TOKENS)
    dla = tl.attribution(cache, best, runner, position=-1)
    patterns = tl.attention(cache, tokens)
    return write_report(path, lens, dla, patterns, title=title or f"Logit lens report: {prompt}", overwrite=overwrite,
                        plotly=plotly)

__all__ = ["REPORT_AUTO_TOKENS", "report_sections", "write_report", "run_report"]
