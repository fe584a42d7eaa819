"""``lens-plugins report``: its file, and a one-line error for each bad input (refused before loading)."""

import pytest

from lens_plugins.cli import main as cli

PROMPT = "The capital of France is"


@pytest.fixture
def invoke(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    asked = []

    def refuse(path):
        asked.append(path)
        raise AssertionError("loaded a model for an input that should have been refused")

    monkeypatch.setattr(cli, "load_model", refuse)

    def run(*argv):
        status = cli.main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err, asked

    return run


@pytest.mark.parametrize("argv, message", [
    (["report", "  "], "the prompt is empty ('  ')"),
    (["report", PROMPT, "--top-k", "1"], "--top-k must be at least 2 (the report compares the top-1 with the runner-up), got 1"),
    (["report", PROMPT, "-o", "no/such/dir/r.html"], "cannot write no/such/dir/r.html: directory "),
])
def test_bad_input_is_refused_before_loading(invoke, argv, message):
    status, _, err, asked = invoke(*argv)
    assert status == 1 and err.startswith("lens-plugins: error: ") and message in err
    assert err.count("\n") == 1 and asked == []


def test_usage(invoke, capsys):
    status, out, _, _ = invoke("report", "--help")
    assert status == 0 and "usage: lens-plugins report" in out and "-o FILE, --output FILE" in out
    status, _, err, _ = invoke("report")
    assert status == 2 and "the following arguments are required: prompt" in err


def test_report_as_a_prompt_goes_after_a_double_dash(invoke, monkeypatch):
    """``lens-plugins -- report`` is the lens table of the prompt "report", not the subcommand."""
    seen = []
    monkeypatch.setattr(cli, "run", lambda args, out: seen.append(args.prompt))
    status, _, _, _ = invoke("--", "report")
    assert status == 0 and seen == ["report"]


def test_model_path_reaches_the_report(invoke, monkeypatch, tmp_path):
    import lens_plugins.methods.report

    calls = []
    monkeypatch.setattr(cli, "load_model", lambda path: calls.append(("load", path)) or "MODEL")
    monkeypatch.setattr(lens_plugins.methods.report, "run_report", lambda model, prompt, path, top_k, overwrite, prepend_bos, **options: calls.append((model, prompt, path, top_k, prepend_bos, options)))
    status, _, err, _ = invoke("report", PROMPT, "--model", "some/dir", "-o", "r.html", "--top-k", "3", "--prepend-bos")
    defaults = {"target": None, "distractor": None, "plotly": "inline"}
    assert status == 0 and calls == [("load", "some/dir"), ("MODEL", PROMPT, "r.html", 3, True, defaults)]
    assert err.splitlines()[-1] == "report written to r.html"
    calls.clear()
    status, _, _, _ = invoke("report", PROMPT, "-o", "s.html", "--target", " Paris", "--distractor", "1234", "--plotly", "cdn")
    assert status == 0 and calls[1][-1] == {"target": " Paris", "distractor": 1234, "plotly": "cdn"}
