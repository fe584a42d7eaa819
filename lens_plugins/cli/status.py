"""One status line per long phase of a command, on stderr, so that a run of tens of seconds is never silent.

On a terminal it is rich's spinner, replaced by a ``done`` line with the phase's seconds; elsewhere (a pipe, a
log, a test) one plain line when the phase starts and one when it ends. stdout carries only the results.
"""

import contextlib
import sys
import time
from typing import Iterator


@contextlib.contextmanager
def status(phase: str) -> Iterator[None]:
    """Show ``phase`` while the body runs, then ``phase: done in N s`` (or ``failed``) on stderr."""
    start = time.perf_counter()
    stream = sys.stderr
    spinner = None
    if stream.isatty():
        from rich.console import Console

        spinner = Console(file=stream).status(f"{phase} ...")
        spinner.start()
    else:
        print(f"lens-plugins: {phase} ...", file=stream, flush=True)
    outcome = "failed"
    try:
        yield
        outcome = "done"
    finally:
        if spinner is not None:
            spinner.stop()
        print(f"lens-plugins: {phase}: {outcome} in {time.perf_counter() - start:.1f} s", file=stream, flush=True)


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars ("Loading weights") and its info chatter: a status line
    says what is happening instead."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

__all__ = ["status", "quiet_transformers"]
