"""Each tutorial is kept twice: ``NN_name.py`` (percent format, the file to edit and review) and
``NN_name.ipynb`` (the same cells, no outputs, for Jupyter). ``python tutorials/notebooks.py`` rewrites
every notebook from its script; ``tests/test_tutorials.py`` fails when a pair has drifted apart.
"""

import json
import re
import sys
from pathlib import Path

TUTORIALS = Path(__file__).resolve().parent


def scripts() -> list[Path]:
    """Every tutorial script, in order (``01_...py`` to ``99_...py``; helpers such as this file are not)."""
    return sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))


def script_cells(path: Path) -> list[tuple[str, str]]:
    """``(cell_type, source)`` of a ``# %%`` percent-format script; markdown lines lose their '# '."""
    parts = re.split(r"^# %%(.*)\n", path.read_text(encoding="utf-8"), flags=re.M)[1:]
    cells = []
    for marker, body in zip(parts[::2], parts[1::2]):
        body = body.strip("\n")
        if "[markdown]" in marker:
            body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            cells.append(("markdown", body))
        else:
            cells.append(("code", body))
    return cells


def notebook(path: Path) -> dict:
    """The nbformat 4.5 notebook holding ``path``'s cells, with stable cell ids and no outputs."""
    cells = []
    for index, (kind, source) in enumerate(script_cells(path)):
        cell = {"cell_type": kind, "id": f"{path.stem[:2]}-{index:02d}", "metadata": {},
                "source": source.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {
        "cells": cells,
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def notebook_text(path: Path) -> str:
    return json.dumps(notebook(path), indent=1, ensure_ascii=False) + "\n"


def main() -> None:
    for script in scripts():
        target = script.with_suffix(".ipynb")
        text = notebook_text(script)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            print("wrote", target.relative_to(TUTORIALS.parent), file=sys.stderr)


if __name__ == "__main__":
    main()
