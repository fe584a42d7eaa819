"""Tutorials run as users run them: every notebook executes top to bottom in a fresh Jupyter kernel (nbclient,
no hub), raises nothing and shows its figures; each notebook matches its ``.py`` script cell for cell."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

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


def test_every_tutorial_has_a_notebook_and_a_docs_line():
    assert len(SCRIPTS) >= 1
    page = (TUTORIALS.parent / "docs" / "tutorials.md").read_text(encoding="utf-8")
    for script in SCRIPTS:
        assert script.with_suffix(".ipynb").exists(), f"run python tutorials/notebooks.py to create {script.stem}.ipynb"
        assert f"tutorials/{script.stem}.ipynb" in page, f"docs/tutorials.md does not name {script.stem}.ipynb"
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
def kernel_env(monkeypatch, tmp_path_factory):
    """The kernel is this interpreter (a kernelspec named like the notebooks' ``python3``, first on
    ``JUPYTER_PATH``, so a user-wide ``python3`` kernel of another Python cannot take its place) and inherits
    this process's environment: offline, this checkout and ``tutorials/`` importable."""
    spec = tmp_path_factory.mktemp("jupyter") / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (lens_plugins tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(p for p in [str(spec.parents[1]), os.environ.get("JUPYTER_PATH", "")] if p))
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
    assert notebook.metadata.get("language_info", {}).get("name") == "python"
    figures = [out for out in outputs(notebook) if "application/vnd.plotly.v1+json" in out.get("data", {})]
    if script.stem not in NO_FIGURES:
        assert figures, f"{script.stem} shows no figure"
    text = text_of(notebook)
    if script.stem == "01_logit_lens":
        assert "model's own top-1: ' Paris'" in text
        assert (tmp_path / "01_logit_lens.html").exists() and (tmp_path / "01_logit_lens_report.html").exists()
    if script.stem == "02_nnsight":
        assert "running the lens on " in text   # it says where the remote trace ran
    if script.stem == "07_exercises":  # the blanks run, and every check says so instead of failing
        assert text.count(": not done yet") == 5 and "FAILED" not in text
    if script.stem == "07_solutions":  # every solution passed its check (asserted in the notebook), the quiz ran
        assert text.count("FAILED") == 9 and all(f"Q{q:>2}: " in text for q in range(1, 11))


# --- the course checks: a correct answer passes, each plausible wrong answer fails ------------------------

checks = _load("course_checks")


def lens_ok(resid, norm, W_U, b_U=None):
    return norm(resid) @ W_U.T + (0 if b_U is None else b_U)


def entropy_ok(logits):
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def kl_ok(p, q):
    return (p.softmax(-1) * (p.log_softmax(-1) - q.log_softmax(-1))).sum(-1)


def dla_ok(z, W_O, final, weight, eps, W_U, t, d):
    return ((z @ W_O) / (final.pow(2).mean() + eps).sqrt() * weight) @ (W_U[t] - W_U[d])


CASES = {
    "logit_lens": (checks.check_logit_lens, lens_ok, {
        "no final norm": lambda r, n, W, b=None: r @ W.T + (0 if b is None else b),
        "no unembedding bias": lambda r, n, W, b=None: n(r) @ W.T,
        "RMS-style norm without the LayerNorm bias": lambda r, n, W, b=None: lens_ok(r, lambda x: n(x) - n.bias, W, b),
    }),
    "entropy": (checks.check_entropy, entropy_ok, {
        "softmax over the wrong axis": lambda l: -(l.softmax(0) * l.log_softmax(0)).sum(-1),
        "log of an underflowed probability": lambda l: -(l.softmax(-1) * l.softmax(-1).log()).sum(-1),
        "bits instead of nats": lambda l: entropy_ok(l) / torch.log(torch.tensor(2.0)),
    }),
    "kl": (checks.check_kl, kl_ok, {
        "softmax over the wrong axis": lambda p, q: (p.softmax(0) * (p.log_softmax(0) - q.log_softmax(0))).sum(-1),
        "KL(row || final)": lambda p, q: kl_ok(q, p),
    }),
    "head_dla": (checks.check_head_dla, dla_ok, {
        "no frozen norm scale": lambda z, W_O, f, w, eps, W_U, t, d: ((z @ W_O) * w) @ (W_U[t] - W_U[d]),
        "no norm weight": lambda z, W_O, f, w, eps, W_U, t, d: dla_ok(z, W_O, f, torch.ones_like(w), eps, W_U, t, d),
        "scale from the head's own write": lambda z, W_O, f, w, eps, W_U, t, d: dla_ok(z, W_O, z @ W_O, w, eps, W_U, t, d),
    }),
}


@pytest.mark.parametrize("name", CASES)
def test_course_check_passes_a_correct_answer(name):
    check, correct, _ = CASES[name]
    assert check(correct) is True


@pytest.mark.parametrize("name,slip", [(n, s) for n, (_, _, wrong) in CASES.items() for s in wrong])
def test_course_check_fails_a_plausible_wrong_answer(name, slip):
    check, _, wrong = CASES[name]
    with pytest.raises(AssertionError):
        check(wrong[slip])
    assert checks.run(check, wrong[slip]).startswith("FAILED")


def test_course_check_patchscope_on_a_tiny_llama():
    """The Patchscope check passes a correct hook-based answer and fails one written a block too early or at
    the wrong position, on a tiny random Llama (3 blocks) (a character tokenizer stands in for the real one)."""
    from tiny_models import tiny_model

    model = tiny_model("llama")
    tokenizer = lambda text, return_tensors=None: {"input_ids": torch.tensor([[ord(c) % 1000 for c in text]])}  # noqa: E731

    def scope(model, source_ids, layer, position, target_ids, target_position, shift=0, moved=0):
        block, saved = model.model.layers[layer + shift], {}

        def read(module, args):
            saved["h"] = args[0][0, position].clone()

        def write(module, args):
            hidden = args[0].clone()
            hidden[0, target_position + moved] = saved["h"]
            return (hidden, *args[1:])

        with torch.no_grad():
            for hook, ids in ((read, source_ids), (write, target_ids)):
                handle = block.register_forward_pre_hook(hook)
                try:
                    logits = model(ids).logits
                finally:
                    handle.remove()
        return logits[0, target_position]

    assert checks.check_patchscope(scope, model, tokenizer)
    with pytest.raises(AssertionError):
        checks.check_patchscope(lambda *a: scope(*a, shift=-1), model, tokenizer)
    with pytest.raises(AssertionError):
        checks.check_patchscope(lambda *a: scope(*a, moved=-1), model, tokenizer)
