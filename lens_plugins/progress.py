"""The package's one progress convention: every long call takes ``progress: bool = False`` (a library prints
nothing unasked), and ``progress=True`` draws a tqdm bar (``tqdm.auto``: a widget in Jupyter, a line on stderr
elsewhere) over the call's natural unit: blocks, pairs, tokens, steps or prompts. The training loop
(``training/loop.py``) and the Jacobian lens's fit draw theirs the same way."""

from typing import Optional


class _Silent:
    """What ``bar`` returns with ``progress=False``: the calls a bar takes, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc) -> None:
        pass


def bar(progress: bool, total: Optional[int], description: str, unit: str):
    """A tqdm bar of ``total`` ``unit``s named ``description`` when ``progress``, else a silent stand-in; use it
    as a context manager (the bar closes on exit, also on an error)."""
    if not progress:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit)


__all__ = ["bar"]
