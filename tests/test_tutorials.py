"""Tutorials run as users run them: every notebook executes top to bottom in a fresh Jupyter kernel (nbclient,
no hub), raises nothing and shows its figures; each notebook matches its ``.py`` script cell for cell."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"tutorials_{name}", TUTORIALS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


notebooks = _load("notebooks")
SCRIPTS = notebooks.scripts()
# Notebooks that draw no plotly figure (the course exercises print checks; the figures are the tutorials').
NO_FIGURES = {"07_exercises", "07_solutions"}


def test_every_tutorial_has_a_notebook_and_a_readme_line():
    assert len(SCRIPTS) >= 1
    readme = (TUTORIALS.parent / "README.md").read_text(encoding="utf-8")
    for script in SCRIPTS:
        assert script.with_suffix(".ipynb").exists(), f"run python tutorials/notebooks.py to create {script.stem}.ipynb"
        assert f"tutorials/{script.stem}.ipynb" in readme, f"README.md does not link {script.stem}.ipynb"
    assert sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb")) == [s.with_suffix(".ipynb") for s in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_notebook_matches_script(script):
    notebook = json.loads(script.with_suffix(".ipynb").read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4 and notebook["metadata"]["kernelspec"]["language"] == "python"
    for cell in notebook["cells"]:
        assert {"cell_type", "metadata", "source"} <= cell.keys()
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and "execution_count" in cell
    cells = [(c["cell_type"], "".join(c["source"])) for c in notebook["cells"]]
    assert cells == notebooks.script_cells(script), f"run python tutorials/notebooks.py after editing {script.name}"
    # the first cell says how to set up
    assert notebook["cells"][0]["cell_type"] == "markdown" and "**Setup**" in "".join(notebook["cells"][0]["source"])


def execute(name: str, cwd: Path):
    """Run ``tutorials/NAME.ipynb`` in a fresh kernel with ``cwd`` as its working directory; return it executed."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell raises
    return notebook


def outputs(notebook) -> list[dict]:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]


def text_of(notebook) -> str:
    return "".join(out.get("text", "") for out in outputs(notebook) if out["output_type"] == "stream")


@pytest.fixture
def kernel_env(monkeypatch):
    """The kernel inherits this process's environment: offline, this checkout importable, tutorials importable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    paths = [str(TUTORIALS.parent), str(TUTORIALS), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_notebook_runs(script, tmp_path, kernel_env):
    notebook = execute(script.stem, tmp_path)
    errors = [out for out in outputs(notebook) if out["output_type"] == "error"]
    assert not errors
    figures = [out for out in outputs(notebook) if "application/vnd.plotly.v1+json" in out.get("data", {})]
    if script.stem not in NO_FIGURES:
        assert figures, f"{script.stem} shows no figure"
    if script.stem == "01_logit_lens":
        assert "model's own top-1: ' Paris'" in text_of(notebook)
        assert (tmp_path / "01_logit_lens.html").exists() and (tmp_path / "01_logit_lens_report.html").exists()
