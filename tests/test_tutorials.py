"""Tutorials run as users run them: every notebook executes top to bottom in a fresh Jupyter kernel (nbclient,
no hub), raises nothing and shows its figures; each notebook matches its ``.py`` script cell for cell."""

import importlib.util
import json
import os
import re
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
        assert text.count(": not done yet") == 9 and "FAILED" not in text
        assert text.count(": not answered") == 10 and "quiz: 0/0 answered correctly" in text
    if script.stem == "07_solutions":  # every solution passed its check (asserted in the notebook), the quiz ran
        assert text.count("FAILED") == 11 and "quiz: 10/10 answered correctly" in text
        assert "quiz: 0/3 answered correctly" in text and text.count("WRONG") == 3
        for block in expected_outputs():  # what the exercises show as expected is what the solutions print
            assert block in text, f"07_exercises' expected output is not what 07_solutions prints:\n{block}"


def expected_outputs() -> list[str]:
    """The ```text blocks under "**Expected output**" in the exercises' markdown."""
    cells = notebooks.script_cells(TUTORIALS / "07_exercises.py")
    return [match.group(1) for kind, source in cells if kind == "markdown"
            for match in re.finditer(r"\*\*Expected output\*\*\s*```text\n(.*?)```", source, flags=re.DOTALL)]


def test_exercises_have_scaffolding():
    """Every exercise states a time budget, has two hints (collapsed) and typed stubs (jaxtyping) that raise
    NotImplementedError; every expected output is filled in (the slow test compares it with the solutions')."""
    cells = notebooks.script_cells(TUTORIALS / "07_exercises.py")
    exercises = [i for i, (kind, source) in enumerate(cells) if kind == "markdown" and source.startswith("## Exercise")]
    assert len(exercises) == 8
    for i in exercises:
        intro, stub = cells[i][1], cells[i + 1][1]
        assert re.search(r"\(⏱ \d+ min\)", intro.splitlines()[0]), intro.splitlines()[0]
        assert intro.count("<details><summary>Hint 1</summary>") == 1 and "<details><summary>Hint 2</summary>" in intro
        assert cells[i + 1][0] == "code" and "raise NotImplementedError" in stub and "[Tensor, " in stub
    blocks = expected_outputs()
    assert len(blocks) == 5 and all(b.strip() and "EXPECTED_" not in b for b in blocks)


# --- the course checks: a correct answer passes, each plausible wrong answer fails, naming its slip ----------

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


def surfaced_ok(row_logits, target, k, *, rank_shift=1, strict=False, by_logit=False, lost=None, overrider_final=False,
                top1_is_top_k=False, dips_override=False):
    """A correct answer to the surfaced exercise; each keyword writes one plausible slip into it."""
    rank = rank_shift + (row_logits > row_logits[:, target, None]).sum(-1)
    in_k = rank < k if strict else rank <= k
    top1 = in_k if top1_is_top_k else rank == 1
    first = lambda mask: int(mask.nonzero()[0]) if mask.any() else -1
    last_top1 = int(top1.nonzero()[-1]) if top1.any() else -1
    kept = bool(top1[-1])
    overridden = bool(top1.any()) and not kept
    if dips_override:  # "overridden" whenever it dipped after surfacing
        overridden = bool(top1.any()) and not bool(top1[first(top1):].all())
        kept = kept and not overridden
    lost_row = -1
    if overridden:
        if lost == "first_dip" or (dips_override and last_top1 + 1 == len(top1)):
            lost_row = next(r for r in range(1, len(top1)) if top1[r - 1] and not top1[r])
        else:
            lost_row = last_top1 if lost == "last_top1" else last_top1 + 1
    peak_of = row_logits[:, target] if by_logit else row_logits.softmax(-1)[:, target]
    overrider = -1 if not overridden else int(row_logits[-1 if overrider_final else lost_row].argmax())
    outcome = "kept" if kept else "overridden" if overridden else "top_k" if in_k.any() else "never"
    return {"first_top1": first(top1), "first_top_k": first(in_k), "peak_row": int(peak_of.argmax()),
            "lost_row": lost_row, "overrider": overrider, "outcome": outcome}


def shortcut_ok(fit_src, fit_dst, test_src, test_dst, decode, *, intercept=True, fit_on_test=False,
                transposed=False, score_fit=False, identity=False, count=False):
    """A correct answer to the linear-shortcut exercise; each keyword writes one plausible slip into it."""
    src, dst = (test_src, test_dst) if fit_on_test else (fit_src, fit_dst)
    X = torch.cat([src, torch.ones(len(src), 1)], 1) if intercept else src
    solution = torch.linalg.lstsq(X, dst).solution
    W, b = (solution[:-1], solution[-1]) if intercept else (solution, torch.zeros(dst.shape[1]))
    W = W.T if transposed else W
    s, d = (fit_src, fit_dst) if score_fit else (test_src, test_dst)
    mapped = s if identity else s @ W + b
    hits = (decode(mapped).argmax(-1) == decode(d).argmax(-1)).float()
    return W, b, hits.sum() if count else hits.mean()


def exit_ok(confidence, agrees, blocks_run, threshold, *, compare=torch.ge, force_last=True, last_confident=False,
            by_row=False, count=False):
    """A correct answer to the early-exit exercise; each keyword writes one plausible slip into it."""
    confident = compare(confidence, threshold)
    if force_last:
        confident[-1] = True
    if last_confident:
        exit_row = len(confident) - 1 - confident.flip(0).int().argmax(0)
    else:
        exit_row = confident.int().argmax(0)
    retention = agrees[exit_row, torch.arange(confidence.shape[1])].float().mean()
    n = int(blocks_run[-1])
    if by_row:
        saved = ((len(blocks_run) - 1 - exit_row).float() / (len(blocks_run) - 1)).mean()
    else:
        saved = (n - blocks_run[exit_row]).float().mean() / (1 if count else n)
    return exit_row, retention, saved


def raises(*args):
    raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


# name -> (check, the correct answer, {slip: (wrong answer, the words its failure must say)})
CASES = {
    "logit_lens": (checks.check_logit_lens, lens_ok, {
        "no final norm": (lambda r, n, W, b=None: r @ W.T + (0 if b is None else b), "apply the final norm"),
        "no unembedding bias": (lambda r, n, W, b=None: n(r) @ W.T, "did you add `b_U`?"),
        "RMS-style norm without the LayerNorm bias": (
            lambda r, n, W, b=None: lens_ok(r, lambda x: n(x) - n.bias, W, b), "drop the norm's bias"),
        "unembedding bias added twice": (lambda r, n, W, b=None: lens_ok(r, n, W, b) + (0 if b is None else b),
                                         "`b_U` twice"),
        "W_U not transposed (raises)": (lambda r, n, W, b=None: n(r) @ W, "raised RuntimeError"),
    }),
    "entropy": (checks.check_entropy, entropy_ok, {
        "softmax over the wrong axis": (lambda l: -(l.softmax(0) * l.log_softmax(0)).sum(-1), "wrong axis"),
        "log of an underflowed probability": (lambda l: -(l.softmax(-1) * l.softmax(-1).log()).sum(-1),
                                              "use log_softmax"),
        "bits instead of nats": (lambda l: entropy_ok(l) / torch.log(torch.tensor(2.0)), "bits instead of nats?"),
        "no minus sign": (lambda l: -entropy_ok(l), "minus sign"),
    }),
    "kl": (checks.check_kl, kl_ok, {
        "softmax over the wrong axis": (
            lambda p, q: (p.softmax(0) * (p.log_softmax(0) - q.log_softmax(0))).sum(-1), "wrong axis"),
        "KL(row || final)": (lambda p, q: kl_ok(q, p), "the wrong way round"),
        "bits instead of nats": (lambda p, q: kl_ok(p, q) / torch.log(torch.tensor(2.0)), "bits instead of nats?"),
    }),
    "head_dla": (checks.check_head_dla, dla_ok, {
        "no frozen norm scale": (lambda z, W_O, f, w, eps, W_U, t, d: ((z @ W_O) * w) @ (W_U[t] - W_U[d]),
                                 "frozen scale"),
        "no norm weight": (lambda z, W_O, f, w, eps, W_U, t, d: dla_ok(z, W_O, f, torch.ones_like(w), eps, W_U, t, d),
                           "norm's weight"),
        "scale from the head's own write": (
            lambda z, W_O, f, w, eps, W_U, t, d: dla_ok(z, W_O, z @ W_O, w, eps, W_U, t, d), "not at the head's own"),
        "distractor minus target": (lambda z, W_O, f, w, eps, W_U, t, d: dla_ok(z, W_O, f, w, eps, W_U, d, t),
                                    "not the other way round"),
        "W_O transposed (raises)": (lambda z, W_O, f, w, eps, W_U, t, d: dla_ok(z, W_O.T, f, w, eps, W_U, t, d),
                                    "inputs: z=Tensor[8] float32, W_O=Tensor[8, 24]"),
    }),
    "surfaced": (checks.check_surfaced, surfaced_ok, {
        "ranks from 0": (lambda *a: surfaced_ok(*a, rank_shift=0), "a rank counts from 1"),
        "top-k as rank < k": (lambda *a: surfaced_ok(*a, strict=True), "rank <= k"),
        "top-1 read as top-k": (lambda *a: surfaced_ok(*a, top1_is_top_k=True), "top-1 and top-k mixed up"),
        "peak of the logit": (lambda *a: surfaced_ok(*a, by_logit=True), "not of its raw logit"),
        "lost at the first dip": (lambda *a: surfaced_ok(*a, lost="first_dip"), "not the first dip"),
        "lost at the last top-1 row (off by one)": (lambda *a: surfaced_ok(*a, lost="last_top1"), "off by one row"),
        "overrider = the final top-1": (lambda *a: surfaced_ok(*a, overrider_final=True), "not the final top-1"),
        "a dip counts as overridden": (lambda *a: surfaced_ok(*a, dips_override=True), "decided by the final row"),
        "returns a tuple (raises in the check)": (lambda *a: tuple(surfaced_ok(*a).values()), "expected a dict"),
    }),
    "shortcut": (checks.check_shortcut, shortcut_ok, {
        "no intercept": (lambda *a: shortcut_ok(*a, intercept=False), "no intercept"),
        "fitted on the held-out pairs": (lambda *a: shortcut_ok(*a, fit_on_test=True), "fitted on the held-out"),
        "W transposed": (lambda *a: shortcut_ok(*a, transposed=True), "W is transposed"),
        "scored on the fit pairs": (lambda *a: shortcut_ok(*a, score_fit=True), "precision on the fit pairs"),
        "the identity's precision": (lambda *a: shortcut_ok(*a, identity=True), "apply your map before decoding"),
        "a count, not a share": (lambda *a: shortcut_ok(*a, count=True), "a count, not a share"),
    }),
    "early_exit": (checks.check_early_exit, exit_ok, {
        "threshold the wrong way": (lambda *a: exit_ok(*a, compare=torch.le), "the threshold's direction"),
        "strictly above the threshold": (lambda *a: exit_ok(*a, compare=torch.gt), ">=, not >"),
        "the last row not forced": (lambda *a: exit_ok(*a, force_last=False), "exits at the last row"),
        "the last confident row": (lambda *a: exit_ok(*a, last_confident=True), "the *first* confident row"),
        "layers saved by row index": (lambda *a: exit_ok(*a, by_row=True), "not rows"),
        "layers saved as a count": (lambda *a: exit_ok(*a, count=True), "not a count"),
        "raises": (raises, "inputs: confidence=Tensor[5, 6] float32, agrees=Tensor[5, 6] bool"),
    }),
}
SLIPS = [(name, slip) for name, (_, _, wrong) in CASES.items() for slip in wrong]


def test_course_checks_count_their_designed_slips():
    """The count docs/tutorials.md states: every designed slip here is caught, by name."""
    assert len(SLIPS) + len(ROWS_SLIPS) + len(SCOPE_SLIPS) == 46


@pytest.mark.parametrize("name", CASES)
def test_course_check_passes_a_correct_answer(name):
    check, correct, _ = CASES[name]
    assert check(correct) is True


@pytest.mark.parametrize("name,slip", SLIPS)
def test_course_check_fails_a_plausible_wrong_answer_naming_the_slip(name, slip):
    check, _, wrong = CASES[name]
    answer, says = wrong[slip]
    with pytest.raises(AssertionError):
        check(answer)
    verdict = checks.run(check, answer)
    assert verdict.startswith("FAILED") and says in verdict, verdict


def test_course_check_says_not_done_yet_and_reads_odd_answers():
    def todo(*args):
        raise NotImplementedError("your code here")

    assert checks.run(checks.check_entropy, todo) == "not done yet"
    assert "expected a torch.Tensor, got str" in checks.run(checks.check_entropy, lambda logits: "3 nats")
    assert "expected shape (4, 7)" in checks.run(checks.check_entropy, lambda logits: entropy_ok(logits)[None])
    assert "expected a tuple (W, b, precision)" in checks.run(checks.check_shortcut, lambda *a: None)


def _char_tokenizer(text, return_tensors=None):
    return {"input_ids": torch.tensor([[ord(c) % 1000 for c in text]])}


def scope_ok(model, source_ids, layer, position, target_ids, target_position, *, shift=0, moved=None, read_at=None,
             read_last=False):
    """A correct hook-based Patchscope; each keyword writes one plausible slip into it."""
    block, saved = model.model.layers[layer + shift], {}

    def read(module, args):
        saved["h"] = args[0][0, position if read_at is None else read_at].clone()

    def write(module, args):
        hidden = args[0].clone()
        hidden[0, target_position if moved is None else moved] = saved["h"]
        return (hidden, *args[1:])

    with torch.no_grad():
        for hook, ids in ((read, source_ids), (write, target_ids)):
            handle = block.register_forward_pre_hook(hook)
            try:
                logits = model(ids).logits
            finally:
                handle.remove()
    return logits[0, -1 if read_last else target_position]


def rows_ok(model, input_ids, *, normed_last=False, outputs_only=False):
    """A correct answer to the block-inputs exercise (hooks); each keyword writes one slip into it."""
    if normed_last:  # Hugging Face's hidden states: the last one is after the final norm
        with torch.no_grad():
            return torch.stack(model(input_ids, output_hidden_states=True).hidden_states)[:, 0]
    rows, hooks = [], []
    if not outputs_only:
        hooks = [b.register_forward_pre_hook(lambda m, a: rows.append(a[0][0])) for b in model.model.layers]
    blocks = model.model.layers if outputs_only else model.model.layers[-1:]
    hooks += [b.register_forward_hook(lambda m, a, out: rows.append((out[0] if isinstance(out, tuple) else out)[0]))
              for b in blocks]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(rows)


ROWS_SLIPS = [({"normed_last": True}, "`hidden_states[-1]` is normed"),
              ({"outputs_only": True}, "only the blocks' outputs")]
SCOPE_SLIPS = [({"shift": 1}, "one block too late"), ({"shift": -1}, "one block too early"),
               ({"read_at": -1}, "you ignored `position`"), ({"moved": -1}, "you ignored `target_position`"),
               ({"read_last": True}, "not at the last token")]


def test_course_checks_of_a_model_on_a_tiny_llama():
    """The checks that need a model (logit lens of real rows, block inputs, Patchscope) pass correct answers and
    fail each slip by name, on a tiny random Llama (3 blocks; a character tokenizer stands in for the real one).
    The Patchscope cases include non-final source and target positions, so ignoring either position fails."""
    from tiny_models import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():  # logits in the hundreds, so that the checks' tolerance resolves one block's difference
        model.model.norm.weight.mul_(1000)
    ids = _char_tokenizer("The capital of France is")["input_ids"]
    assert checks.check_logit_lens(lens_ok, model, ids)
    assert checks.check_block_inputs(rows_ok, model, ids)
    for slip, says in ROWS_SLIPS:
        verdict = checks.run(checks.check_block_inputs, lambda m, i, slip=slip: rows_ok(m, i, **slip), model, ids)
        assert verdict.startswith("FAILED") and says in verdict, verdict

    assert checks.check_patchscope(scope_ok, model, _char_tokenizer)
    for slip, says in SCOPE_SLIPS:
        verdict = checks.run(checks.check_patchscope, lambda *a, slip=slip: scope_ok(*a, **slip), model, _char_tokenizer)
        assert verdict.startswith("FAILED") and says in verdict, (slip, verdict)


@pytest.mark.slow
def test_quiz_question_3_agrees_with_tutorial_01(smollm2_hf, smollm2_bridge, capsys):
    """Question 3's answer, as check_quiz computes it (plain torch on the HF model, `tokenizer(prompt)`), is the
    row tutorial 01 finds (TransformerLens, `prepend_bos=None`); the with-BOS row is another one, and check_quiz
    marks it wrong naming the BOS."""
    import lens_plugins as lp

    model, tokenizer = smollm2_hf

    def first_paris(prepend_bos):
        run = lp.transformer_lens.run_logit_lens(smollm2_bridge, checks.QUIZ_PROMPT, targets=[" Paris"],
                                                 prepend_bos=prepend_bos)
        return run.labels[int((run.rank_of(" Paris")[:, 0, -1] == 1).nonzero()[0])]

    default, with_bos = first_paris(None), first_paris(True)
    assert default != with_bos
    assert checks.check_quiz({3: default}, model, tokenizer)[3] is True
    assert checks.check_quiz({3: with_bos}, model, tokenizer)[3] is False
    assert "with a BOS prepended" in capsys.readouterr().out
