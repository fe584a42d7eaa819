"""``lens-plugins train-lens``: train a tuned lens from the shell, save it in tuned-lens's layout, and print
its held-out KL per row next to the logit lens's.

Every path is checked before the model loads (a run must not end in a path error): ``--out`` may not be a
model's directory, and a lens already there is replaced only with ``--force``. The training state goes to
``--checkpoint`` (default ``<out>.checkpoint``) every ``--checkpoint-every`` steps and on Ctrl-C or SIGTERM, so
rerunning the same line resumes; it is deleted once the lens is saved. Bad input exits with status 1 and a
one-line message (usage errors with 2, as argparse does); an interrupt with 130.
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Optional

from lens_plugins.core.errors import LensFileNotFoundError, LensValueError
from lens_plugins.files import atomic_write, check_dir

EVAL_FILE = "heldout_eval.csv"  # written into --out beside the lens's config.json and params.pt

EXAMPLES = """examples:
  lens-plugins train-lens --out lenses/smollm2                       # built-in corpus, default model
  lens-plugins train-lens --text data.jsonl --model ./my-hf-model --out lenses/mine --steps 250
  lens-plugins train-lens --out lenses/smollm2 --steps 1000    # interrupted? rerun the same line to resume
  lens-plugins train-lens --out lenses/smollm2 --force          # replace the lens saved there
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-plugins train-lens",
        description="Train a tuned lens (Belrose et al. 2023) on a frozen model; save config.json + params.pt.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to save the lens to (tuned-lens layout)")
    parser.add_argument("--model", metavar="PATH", help="a local Hugging Face causal-LM directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--text", metavar="FILE", help="a .txt (blank-line separated) or .jsonl ('text' field) file (default: "
                        "the built-in offline corpus, CPython's pydoc_data.topics)")
    parser.add_argument("--steps", type=int, default=250, help="optimiser steps (default 250)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    parser.add_argument("--batch-size", type=int, default=1, help="blocks per forward pass (default 1)")
    parser.add_argument("--accumulate", type=int, default=1, help="forward passes per step (default 1)")
    parser.add_argument("--loss", choices=["kl", "ce"], default="kl", help="KL to the final layer (default) or next-token CE")
    parser.add_argument("--lr", type=float, default=1.0, help="learning rate, before the (1 - momentum) factor (default 1)")
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="default 1e-3")
    parser.add_argument("--seed", type=int, default=0, help="fixes the held-out split and the batch order (default 0)")
    parser.add_argument("--heldout", type=float, default=0.1, help="fraction of blocks held out (default 0.1)")
    parser.add_argument("--init", choices=["zero", "shortcut"], default="zero",
                        help="translators start at zero (the logit lens; default) or at least-squares maps")
    parser.add_argument("--shortcut-blocks", type=int, default=32, help="blocks the shortcut start is fitted on (default 32)")
    parser.add_argument("--matmul-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the loss's vocabulary matmuls (bfloat16: ~3x faster on CPUs with bf16 units)")
    parser.add_argument("--force", action="store_true", help="replace a lens already saved in --out (default: refuse)")
    parser.add_argument("--checkpoint", metavar="DIR", help="resumable training state, saved there and resumed from "
                        "(default: <out>.checkpoint; deleted once the lens is saved)")
    parser.add_argument("--checkpoint-every", type=int, metavar="N", help="save the state every N steps, and always "
                        "on Ctrl-C / SIGTERM (default 25; 0: only on an interrupt)")
    parser.add_argument("--eval-blocks", type=int, default=4, metavar="N",
                        help="held-out blocks to evaluate the lens on afterwards (0: skip; default 4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace, out) -> None:
    import torch

    from lens_plugins.lenses.tuned import CONFIG_FILE, PARAMS_FILE, TunedLens
    from lens_plugins.methods.evaluate import evaluate_lenses
    from lens_plugins.models import DEFAULT_MODEL_NAME, default_model_dir, load_hf_model
    from lens_plugins.training import loop
    from lens_plugins.training.tuned_lens import train_tuned_lens

    if args.text is not None and not Path(args.text).exists():
        raise LensFileNotFoundError(f"no text file at {args.text}")
    if args.eval_blocks < 0:
        raise LensValueError(f"--eval-blocks must be 0 or more, got {args.eval_blocks}")
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint(args.out)
    check_dir(args.out, (CONFIG_FILE, PARAMS_FILE, EVAL_FILE), overwrite=args.force)
    check_dir(checkpoint, overwrite=True)  # an existing state there is resumed, not refused
    every = loop.CHECKPOINT_EVERY if args.checkpoint_every is None else args.checkpoint_every
    hf, tokenizer = load_hf_model(args.model if args.model else default_model_dir())
    hf.tokenizer = tokenizer
    name = Path(args.model).name if args.model else DEFAULT_MODEL_NAME
    lens = TunedLens.for_model(hf)
    lens.config["base_model_name_or_path"] = name
    start, cpu_start = time.perf_counter(), time.process_time()
    lens = train_tuned_lens(
        hf, args.text, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, accumulate=args.accumulate,
        loss=args.loss, lr=args.lr, weight_decay=args.weight_decay, heldout=args.heldout, seed=args.seed, lens=lens,
        init=args.init, shortcut_blocks=args.shortcut_blocks, checkpoint=str(checkpoint), checkpoint_every=every,
        progress=not args.no_progress, matmul_dtype=getattr(torch, args.matmul_dtype),
    )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    lens.save(args.out, overwrite=args.force)
    (checkpoint / loop.STATE_FILE).unlink()  # the lens is saved: the state has nothing left to resume
    with contextlib.suppress(OSError):  # a directory holding anything else is the user's: left alone
        checkpoint.rmdir()
    tokens = args.steps * args.accumulate * args.batch_size * args.seq_len
    print(f"trained in {seconds:.0f} s ({cpu_seconds:.0f} CPU-seconds over {torch.get_num_threads()} threads; "
          f"{args.steps} steps, {tokens} tokens); saved to {args.out}", file=out)
    if args.eval_blocks:
        result = evaluate_lenses(hf, lens.heldout_blocks[: args.eval_blocks], [TunedLens.for_model(hf), lens],
                                 names=["logit lens", "tuned lens"])
        table = result.table("kl")
        with atomic_write(Path(args.out) / EVAL_FILE) as staging:
            result.to_dataframe().to_csv(staging, index=False)
        print(f"held-out KL(final || lens), nats, over {result.tokens} tokens "
              f"(table in {Path(args.out) / EVAL_FILE}):", file=out)
        print(table.to_string(float_format=lambda v: f"{v:.4f}"), file=out)


def default_checkpoint(out: str) -> Path:
    """``<out>.checkpoint`` beside the lens directory: derived from ``--out``, so the same line finds it again."""
    out_path = Path(out).resolve()  # resolved: "--out ." has no name to derive from
    return out_path.with_name(out_path.name + ".checkpoint")


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    try:
        run(args, sys.stdout)
    except (ValueError, OSError, TypeError) as error:
        print(f"lens-plugins train-lens: error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the trainer has saved the state and said where
        print("lens-plugins train-lens: interrupted", file=sys.stderr)
        return 130
    return 0

__all__ = ["EXAMPLES", "EVAL_FILE", "build_parser", "run", "default_checkpoint", "main"]
