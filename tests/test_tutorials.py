"""Tutorials run as users run them (fresh interpreter, no hub) and the notebook matches its script."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


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


def test_notebook_matches_script():
    notebook = json.loads((TUTORIALS / "01_logit_lens.ipynb").read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4 and notebook["metadata"]["kernelspec"]["language"] == "python"
    for cell in notebook["cells"]:
        assert {"cell_type", "metadata", "source"} <= cell.keys()
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and "execution_count" in cell
    cells = [(c["cell_type"], "".join(c["source"])) for c in notebook["cells"]]
    assert cells == script_cells(TUTORIALS / "01_logit_lens.py")


@pytest.mark.slow
def test_logit_lens_tutorial_runs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(TUTORIALS / "01_logit_lens.py")], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model's own top-1: ' Paris'" in proc.stdout
    assert re.search(r"29_post  ' Paris' 0\.7\d", proc.stdout)
    assert re.search(r"29_post  rank +1 ", proc.stdout) and re.search(r"   embed  rank +\d{3,} ", proc.stdout)
    # Input discarding: the embeddings rank most input tokens first; after block 0, none.
    first = re.search(r"embed  input token ranked first at (\d+)/(\d+) positions", proc.stdout)
    assert first and int(first[1]) / int(first[2]) > 0.6
    assert re.search(r"1_pre  input token ranked first at 0/\d+ positions", proc.stdout)
    assert (tmp_path / "01_logit_lens.html").exists() and (tmp_path / "01_logit_lens_report.html").exists()
