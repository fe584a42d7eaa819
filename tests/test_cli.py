"""The ``lens-plugins`` command: its table, its HTML file, and a one-line error for each bad input."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lens_plugins.cli import main as cli

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture
def run(smollm2_bridge, monkeypatch, tmp_path, capsys):
    """``main(argv)`` in a scratch directory on the session's bridge (loading is tested separately, by
    the console-script test); returns ``(status, stdout, stderr, model paths asked for)``."""
    monkeypatch.chdir(tmp_path)
    asked = []

    def load(path):
        asked.append(path)
        return smollm2_bridge

    monkeypatch.setattr(cli, "load_model", load)

    def invoke(*argv):
        status = cli.main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err, asked

    return invoke


STATUS = re.compile(r"lens-plugins: .* \.\.\.|lens-plugins: .*: (done|failed) in \d+\.\d s")


def messages(err: str) -> list[str]:
    """stderr without the status lines of the phases (``lens_plugins.cli.status``)."""
    return [line for line in err.splitlines() if not STATUS.fullmatch(line)]


def final_row(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("29_post"))


def test_default_prompt_table_and_html(tmp_path, monkeypatch, capsys):
    """The real default model, loaded the way the command loads it (the other tests share a bridge)."""
    monkeypatch.chdir(tmp_path)
    status = cli.main([PROMPT, "--targets", " Paris"])
    out, err = capsys.readouterr()
    assert status == 0
    header = out.splitlines()[1]
    assert header.split()[:3] == ["row", "0", "'The'"] and header.endswith("4 ' is'")  # as the tokenizer: no BOS
    assert re.search(r"' Paris' 0\.7\d$", final_row(out))  # the model's answer, last position
    assert out.splitlines()[32].startswith("embed")  # final row first, embedding last
    assert "rank ' Paris'" in out
    html = (tmp_path / "lens.html").read_text(encoding="utf-8")
    assert "plotly.js v" in html and html.count("Plotly.newPlot(") == 6
    assert '"ticktext":["embed","1_pre"' in html and "<h2>rank[ Paris]</h2>" in html
    # A status line as each phase starts and ends, then the file; no weight-loading progress bar, no warnings.
    lines = err.splitlines()
    assert lines[-1] == "heatmaps written to lens.html", err
    phases = ["loading SmolLM2-135M-Instruct into TransformerLens", "running the logit lens", "writing lens.html"]
    expected = [pattern for phase in phases for pattern in (re.escape(f"lens-plugins: {phase} ..."),
                                                             re.escape(f"lens-plugins: {phase}: done in ") + r"\d+\.\d s")]
    assert len(lines) == len(expected) + 1 and all(re.fullmatch(p, line) for p, line in zip(expected, lines)), err


def test_rich_table_on_a_terminal(run, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    status = cli.main([PROMPT, "--no-html"])
    out = re.sub(r"\x1b\[[0-9;]*m", "", sys.stdout.getvalue())  # rich styles a terminal's output
    assert status == 0
    assert "┃ row" in out and re.search(r"│ 29_post │.*' Paris' 0\.7\d +│", out)


def test_plain_flag_and_html_options(run, tmp_path):
    status, out, _, _ = run(PROMPT, "--plain", "--html", "", "--top-k", "2", "--metric", "entropy")
    assert status == 0 and not (tmp_path / "lens.html").exists()
    assert "┃" not in out and "#3" not in out and "#2" in out
    status, _, _, _ = run(PROMPT, "--html", "out.html", "--metric", "entropy", "kl_row_final")
    html = (tmp_path / "out.html").read_text(encoding="utf-8")
    assert status == 0 and html.count("Plotly.newPlot(") == 2 and "<h2>kl_row_final</h2>" in html


@pytest.mark.parametrize("argv, columns", [
    (["--positions", "0", "2", "4"], ["0 'The'", "2 ' of'", "4 ' is'"]),
    (["--positions", "-2:"], ["3 ' France'", "4 ' is'"]),
    (["--positions=::2", "--prepend-bos"], ["0 '<|im_start|>'", "2 ' capital'", "4 ' France'"]),  # BOS at 0
    (["--positions", "4", "-1", "3:"], ["3 ' France'", "4 ' is'"]),  # duplicates collapse
])
def test_positions(run, argv, columns):
    status, out, _, _ = run(PROMPT, "--no-html", *argv)
    assert status == 0
    header = out.splitlines()[1]
    assert re.split(r"\s{2,}", header) == ["row", *columns]


def test_model_path_is_passed_through(run):
    _, _, _, asked = run(PROMPT, "--no-html", "--model", "some/dir")
    assert asked == ["some/dir"]


@pytest.mark.parametrize("argv, message", [
    (["  "], "the prompt is empty ('  ')"),
    ([PROMPT, "--positions", "5"], "position 5 is out of range for a prompt of 5 tokens (valid: -5 .. 4"),
    ([PROMPT, "--positions", "-7"], "position -7 is out of range"),
    ([PROMPT, "--positions", "10:"], "positions 10: select nothing in a prompt of 5 tokens"),
    ([PROMPT, "--targets", " Parisian"], "target ' Parisian' is 2 tokens, not one"),
    ([PROMPT, "--top-k", "0"], "--top-k must be at least 1, got 0"),
    ([PROMPT, "--metric", "probability"], "unknown metric 'probability'"),
    ([PROMPT, "--html", "no/such/dir/x.html"], "cannot write no/such/dir/x.html: directory "),
    ([PROMPT, "--metric", "rank[ Paris]"], "target metrics need targets=[...]"),
])
def test_bad_input_is_one_line_on_stderr(run, argv, message):
    status, _, err, asked = run(*argv)
    assert status == 1
    assert messages(err) == [err.splitlines()[-1]] and err.splitlines()[-1].startswith("lens-plugins: error: ")
    assert message in err and "Traceback" not in err
    if asked == []:
        assert err.count("\n") == 1  # refused before any phase began: the error alone
    if "position" not in message and "target " not in message:
        assert asked == []  # refused before spending seconds on loading the model


def test_bad_position_syntax_is_a_usage_error(run):
    status, _, err, asked = run(PROMPT, "--positions", "last")
    assert status == 2 and "'last' is not a position" in err and asked == []


@pytest.mark.parametrize("files, message", [
    ({}, "is not a Hugging Face model directory (no config.json)"),
    ({"config.json": json.dumps({"model_type": "bert", "architectures": ["BertModel"]})}, "not a causal language model"),
])
def test_bad_model_dir(tmp_path, capsys, files, message):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    status = cli.main([PROMPT, "--model", str(tmp_path), "--no-html"])
    err = capsys.readouterr().err
    assert status == 1 and message in err and len(messages(err)) == 1
    assert re.search(r"loading .*: failed in ", err)  # the phase that failed says so


def test_console_script_error_has_no_traceback(tmp_path):
    """The installed entry point, in a fresh interpreter: exit status 1 and one line, no traceback."""
    script = Path(sys.executable).with_name("lens-plugins")
    proc = subprocess.run([str(script), PROMPT, "--model", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert messages(proc.stderr) == [proc.stderr.splitlines()[-1]]  # the phase's status line, then the error alone
    assert proc.stderr.splitlines()[-1].startswith("lens-plugins: error: ") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_lens_from_a_file(run, tmp_path, smollm2_bridge):
    """``--lens PATH``: a Jacobian lens file decodes the rows it has matrices for (the others are left out and
    said so); an identity lens prints the logit lens's numbers for those rows."""
    import torch

    import lens_plugins as lp

    eye = lp.JacobianLens({27: torch.eye(576), 28: torch.eye(576)}, n_prompts=1, d_model=576,
                          metadata={"target_layer": 29})
    path = eye.save(tmp_path / "jlens.pt")
    status, out, err, _ = run(PROMPT, "--plain", "--no-html", "--lens", str(path))
    assert status == 0 and "decoding rows 28_pre .. 29_post" in err
    rows = [line.split()[0] for line in out.splitlines() if line[:2].isdigit() or line.startswith("embed")]
    assert set(rows) == {"28_pre", "29_pre", "29_post"}
    _, plain, _, _ = run(PROMPT, "--plain", "--no-html")
    for label in ("28_pre", "29_pre", "29_post"):
        assert next(line for line in out.splitlines() if line.startswith(label)).split() == \
            next(line for line in plain.splitlines() if line.startswith(label)).split()
    bad = lp.JacobianLens({0: torch.eye(64)}, n_prompts=1, d_model=64).save(tmp_path / "other.pt")
    status, _, err, _ = run(PROMPT, "--plain", "--no-html", "--lens", str(bad))
    assert status != 0 and "d_model" in err
