"""Hostile files and lost work (issue 25): no loader runs code from a pickle, no output is written over a model or
an existing file unless asked, every path is checked before the work, and an interrupted training run leaves a
checkpoint that resumes to the very weights of an uninterrupted one."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import lens_plugins as lp
from lens_plugins.cli import main as cli
from lens_plugins.cli import train_lens as cli_train
from lens_plugins.files import atomic_write
from lens_plugins.lenses import future as fl
from lens_plugins.lenses.tuned import TunedLens
from lens_plugins.methods.report import run_report, write_report
from lens_plugins.training import loop as train
from lens_plugins.training import tuned_lens as train_lens
from synthetic_results import lens_result
from tiny_models import VOCAB, tiny_model

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Touch:
    """Unpickling this creates ``marker``: the harmless stand-in for any code a crafted file could run."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def hostile(path, marker, **plain):
    """A torch file whose unpickling would create ``marker``, beside plain entries that look right."""
    torch.save({**plain, "payload": Touch(marker)}, path)
    return path


def test_the_hostile_file_does_run_code_when_fully_unpickled(tmp_path):
    """The premise of every test below: loaded the old way, the file runs its payload."""
    hostile(tmp_path / "evil.pt", tmp_path / "ran")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


def refused(call, path, marker, fix):
    """``call`` refuses the file at ``path`` with a ``LensError`` naming it, the reason and ``fix``, and the
    payload never runs."""
    with pytest.raises(lp.LensError) as caught:
        call()
    assert not marker.exists(), "the payload ran"
    message = str(caught.value)
    assert str(path) in message and "unpickling can run code" in message and fix in message
    return caught.value


CHECKPOINT_FIX = "(or its directory) to train from the start"


# --- loaders --------------------------------------------------------------------------------------------------


def test_tuned_lens_params_cannot_run_code(tmp_path):
    TunedLens(8, 2).save(tmp_path / "lens")
    hostile(tmp_path / "lens" / "params.pt", tmp_path / "ran")
    error = refused(lambda: TunedLens.load(tmp_path / "lens"), tmp_path / "lens" / "params.pt", tmp_path / "ran",
                    "if you trust the file, load it yourself and torch.save its tensors")
    assert isinstance(error, ValueError)  # keeps its builtin base


def test_future_lens_file_cannot_run_code(tmp_path):
    path = hostile(tmp_path / "future.pt", tmp_path / "ran", format=fl.FORMAT, labels=["embed"], n_ahead=2)
    refused(lambda: fl.FutureLens.load(path), path, tmp_path / "ran", "FutureLens.save writes one")


def test_affine_lens_has_no_loader():
    """``AffineLens`` is built from tensors the caller holds; it reads no file, so it has nothing to refuse."""
    assert not any(hasattr(lp.AffineLens, name) for name in ("load", "from_file", "from_pretrained"))


def hostile_checkpoint(directory, marker):
    directory.mkdir()
    return hostile(directory / train.STATE_FILE, marker, step=1, history=[], config={})


def test_a_training_checkpoint_cannot_run_code_through_fit(tmp_path):
    path = hostile_checkpoint(tmp_path / "ckpt", tmp_path / "ran")
    module = torch.nn.Linear(2, 2)
    refused(lambda: train.fit(module, torch.randn(4, 2), lambda m, b: m(b).pow(2).mean(), train.TrainConfig(steps=2),
                              checkpoint=tmp_path / "ckpt"), path, tmp_path / "ran", CHECKPOINT_FIX)


def test_a_training_checkpoint_cannot_run_code_through_tuned_lens_train(tmp_path):
    path = hostile_checkpoint(tmp_path / "ckpt", tmp_path / "ran")
    blocks = torch.randint(3, VOCAB, (8, 8), generator=torch.Generator().manual_seed(0))
    refused(lambda: TunedLens.train(tiny_model("llama"), blocks, steps=2, vocab_chunk=256,
                                    checkpoint=str(tmp_path / "ckpt")), path, tmp_path / "ran", CHECKPOINT_FIX)


class CharTokenizer:
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % (VOCAB - 3) for c in text]}


def test_a_training_checkpoint_cannot_run_code_through_train_future_lens(tmp_path):
    path = hostile_checkpoint(tmp_path / "ckpt", tmp_path / "ran")
    refused(lambda: fl.train_future_lens(tiny_model("llama"), CharTokenizer(), 2, texts=["some text " * 40],
                                         seq_len=16, config=train.TrainConfig(steps=2), checkpoint=tmp_path / "ckpt"),
            path, tmp_path / "ran", CHECKPOINT_FIX)


# --- a tiny model directory for the command line --------------------------------------------------------------

WORDS = "the quick brown fox jumps over lazy dog and a cat sat on mat".split()


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama saved as a Hugging Face directory, with a word-level tokenizer (no download, no SmolLM2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path / "model"
    tiny_model("llama").save_pretrained(path)
    vocab = {"[UNK]": 0, "</s>": 1, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>").save_pretrained(path)
    (tmp_path / "text.txt").write_text("\n\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))) * 8)
    return path


def train_line(model_dir, out, *extra):
    return ["train-lens", "--model", str(model_dir), "--text", str(model_dir.parent / "text.txt"), "--out", str(out),
            "--steps", "4", "--seq-len", "8", "--batch-size", "2", "--eval-blocks", "0", "--no-progress", *extra]


@pytest.fixture
def no_model_loading(monkeypatch):
    import lens_plugins.models

    def refuse(*args, **kwargs):
        raise AssertionError("loaded a model for a command that should have been refused")

    monkeypatch.setattr(lens_plugins.models, "load_hf_model", refuse)


def test_train_lens_checkpoint_cannot_run_code(model_dir, tmp_path, capsys):
    path = hostile_checkpoint(tmp_path / "ckpt", tmp_path / "ran")
    status = cli.main(train_line(model_dir, tmp_path / "lens", "--checkpoint", str(tmp_path / "ckpt")))
    err = capsys.readouterr().err
    assert status == 1 and not (tmp_path / "ran").exists()
    assert "lens-plugins train-lens: error: " in err and str(path) in err and CHECKPOINT_FIX in err


# --- outputs --------------------------------------------------------------------------------------------------


def test_train_lens_never_writes_into_the_model_directory(model_dir, capsys, no_model_loading):
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    for extra in ((), ("--force",)):
        assert cli.main(train_line(model_dir, model_dir, *extra)) == 1
        err = capsys.readouterr().err
        assert f"{model_dir} is a model's directory" in err and "choose another directory" in err
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before  # config.json byte-identical
    assert not model_dir.with_name("model.checkpoint").exists()


def a_saved_lens(tmp_path):
    """``(--out, a file that must survive)``."""
    (tmp_path / "lens").mkdir()
    (tmp_path / "lens" / "params.pt").write_text("old")
    return tmp_path / "lens", tmp_path / "lens" / "params.pt"


def a_file(tmp_path):
    (tmp_path / "lens").write_text("old")
    return tmp_path / "lens", tmp_path / "lens"


def below_a_file(tmp_path):
    (tmp_path / "blocker").write_text("old")
    return tmp_path / "blocker" / "lens", tmp_path / "blocker"


@pytest.mark.parametrize("make_out, message", [
    (a_saved_lens, "lens already holds params.pt: pass overwrite=True (--force on the command line)"),
    (a_file, "lens: it is a file, not a directory"),
    (below_a_file, "blocker is a file, not a directory"),
])
def test_train_lens_checks_out_before_loading_the_model(model_dir, tmp_path, capsys, no_model_loading, make_out,
                                                        message):
    out, kept = make_out(tmp_path)
    assert cli.main(train_line(model_dir, out)) == 1
    err = capsys.readouterr().err
    assert message in err and str(out) in err and kept.read_text() == "old"


def test_tuned_lens_save_refuses_to_overwrite_unless_asked(tmp_path):
    TunedLens(8, 2).save(tmp_path / "lens")
    old = (tmp_path / "lens" / "params.pt").read_bytes()
    trained = TunedLens(8, 2)
    torch.nn.init.ones_(trained.layer_translators[0].weight)
    with pytest.raises(lp.LensError, match=r"lens already holds config.json, params.pt: pass overwrite=True"):
        trained.save(tmp_path / "lens")
    assert (tmp_path / "lens" / "params.pt").read_bytes() == old
    trained.save(tmp_path / "lens", overwrite=True)
    assert torch.equal(TunedLens.load(tmp_path / "lens").layer_translators[0].weight, torch.ones(8, 8))
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["config.json", "params.pt"]  # no staging left


def test_tuned_lens_save_never_writes_into_a_model_directory(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path / "model")
    config = (tmp_path / "model" / "config.json").read_bytes()
    for overwrite in (False, True):
        with pytest.raises(lp.LensError, match="is a model's directory"):
            TunedLens(8, 2).save(tmp_path / "model", overwrite=overwrite)
    assert (tmp_path / "model" / "config.json").read_bytes() == config
    assert not (tmp_path / "model" / "params.pt").exists()


def test_future_lens_save_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "future.pt"
    fl.FutureLens(8, ["embed"], 2).save(path)
    other = fl.FutureLens(8, ["embed"], 3)
    with pytest.raises(lp.LensError, match=r"future.pt already exists: pass overwrite=True"):
        other.save(path)
    assert fl.FutureLens.load(path).n_ahead == 2
    other.save(path, overwrite=True)
    assert fl.FutureLens.load(path).n_ahead == 3
    with pytest.raises(lp.LensError, match="it is a directory"):
        other.save(tmp_path)


def test_reports_refuse_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "report.html"
    path.write_text("keep me")
    with pytest.raises(lp.LensError, match=r"report.html already exists: pass overwrite=True"):
        write_report(path, lens_result())
    with pytest.raises(lp.LensError, match=r"report.html already exists"):
        run_report(None, "a prompt", path)  # refused before the model (here: none) runs
    assert path.read_text() == "keep me"
    write_report(path, lens_result(), overwrite=True)
    assert "plotly" in path.read_text() and [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_html_report_and_to_html_refuse_to_overwrite_unless_asked(tmp_path):
    from lens_plugins.plot.figures import html_report

    result = lens_result()
    for name, write in [("lens.html", lambda path, **kw: html_report(result, path, **kw)),
                        ("prob.html", lambda path, **kw: result.to_html(str(path), **kw))]:
        path = tmp_path / name
        path.write_text("keep me")
        with pytest.raises(lp.LensError, match=rf"{name} already exists: pass overwrite=True"):
            write(path)
        assert path.read_text() == "keep me"
        write(path, overwrite=True)
        assert "plotly" in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens.html", "prob.html"]  # no staging file left


@pytest.mark.parametrize("argv, name", [
    (["a prompt"], "lens.html"),
    (["a prompt", "--html", "mine.html"], "mine.html"),
    (["report", "a prompt"], "report.html"),
    (["report", "a prompt", "-o", "mine.html"], "mine.html"),
])
def test_the_html_commands_refuse_an_existing_file_before_loading(argv, name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_model", lambda path: pytest.fail("loaded a model for a refused command"))
    (tmp_path / name).write_text("keep me")
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"{name} already exists: pass overwrite=True (--force" in err
    assert (tmp_path / name).read_text() == "keep me"


def test_the_html_commands_overwrite_with_force(tmp_path, monkeypatch, capsys):
    """``--force`` reaches the writer: the file is replaced (here by the report of a stub run)."""
    import lens_plugins.methods.report as report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_model", lambda path: "MODEL")
    monkeypatch.setattr(report, "run_report", lambda model, prompt, path, top_k, overwrite, **_:
                        write_report(path, lens_result(), overwrite=overwrite))
    (tmp_path / "report.html").write_text("old")
    assert cli.main(["report", "a prompt", "--force"]) == 0
    assert "plotly" in (tmp_path / "report.html").read_text()


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as staging:
            staging.write_text("half of the new")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


# --- interrupted training -------------------------------------------------------------------------------------


def blocks_(n=20, seq=16):
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(5))


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    """``checkpoint_every=0``: only the interrupt can have saved the state the resumed run starts from."""
    hf, blocks = tiny_model("llama"), blocks_()
    kwargs = dict(steps=6, batch_size=2, seed=2, vocab_chunk=256, checkpoint_every=0)
    straight = train_lens.train_tuned_lens(hf, blocks, **kwargs)
    real, calls = train_lens.tuned_lens_losses, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 4:  # during step 4: three steps are done
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(train_lens, "tuned_lens_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_lens.train_tuned_lens(hf, blocks, checkpoint=str(tmp_path / "ckpt"), **kwargs)
    err = capsys.readouterr().err
    assert f"checkpoint in {tmp_path / 'ckpt'}" in err and f"interrupted after step 3 of 6; state saved in {tmp_path / 'ckpt'}" in err
    assert torch.load(tmp_path / "ckpt" / train.STATE_FILE, weights_only=True)["step"] == 3
    monkeypatch.setattr(train_lens, "tuned_lens_losses", real)
    resumed = train_lens.train_tuned_lens(hf, blocks, checkpoint=str(tmp_path / "ckpt"), **kwargs)
    assert "step 3 of 6 restored" in capsys.readouterr().err
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.history == straight.history and any(p.abs().sum() > 0 for p in resumed.parameters())


def linear_run(checkpoint=None, steps=6):
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 4)
    data = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    train.fit(module, data, lambda m, b: (m(b) - b.flip(-1)).pow(2).mean(), train.TrainConfig(steps=steps, batch_size=2,
              checkpoint_every=0), checkpoint=checkpoint)
    return module


def test_a_signal_inside_an_update_waits_for_it_to_finish(tmp_path, monkeypatch):
    """SIGINT delivered inside ``optimizer.step`` stops the run only once the step, the schedule and the history
    agree, so the saved state is that of a whole step and resumes exactly."""
    straight = linear_run()
    make = train.make_optimizer
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or a background CI job, not always Python's

    def with_a_signal(params, config):
        optimizer, updates = make(params, config), []

        def signal_in_the_second_update(opt, args, kwargs):
            updates.append(1)
            if len(updates) == 2:
                os.kill(os.getpid(), signal.SIGINT)  # handled while optimizer.step has not returned

        optimizer.register_step_post_hook(signal_in_the_second_update)
        return optimizer

    monkeypatch.setattr(train, "make_optimizer", with_a_signal)
    with pytest.raises(KeyboardInterrupt):
        linear_run(tmp_path)
    state = torch.load(tmp_path / train.STATE_FILE, weights_only=True)
    assert state["step"] == 2 and len(state["history"]) == 2 and state["schedule"]["last_epoch"] == 2
    monkeypatch.setattr(train, "make_optimizer", make)
    resumed = linear_run(tmp_path)
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back


def test_sigterm_saves_the_state_then_terminates(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, torch
        from lens_plugins.training import loop as train
        calls = []
        def loss(m, b):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return m(b).pow(2).mean()
        train.fit(torch.nn.Linear(2, 2), torch.randn(8, 2), loss, train.TrainConfig(steps=9, checkpoint_every=0),
                  checkpoint={str(tmp_path / "ckpt")!r})
        print("not reached")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGTERM, run.stderr
    assert "not reached" not in run.stdout and f"state saved in {tmp_path / 'ckpt'}" in run.stderr
    assert torch.load(tmp_path / "ckpt" / train.STATE_FILE, weights_only=True)["step"] == 2


def test_rerunning_the_interrupted_command_line_resumes_to_the_same_lens(model_dir, tmp_path, monkeypatch, capsys):
    assert cli.main(train_line(model_dir, tmp_path / "straight")) == 0
    real, calls = train_lens.tuned_lens_losses, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(train_lens, "tuned_lens_losses", interrupted)
    line = train_line(model_dir, tmp_path / "lens")
    assert cli.main(line) == 130
    checkpoint = tmp_path / "lens.checkpoint"
    assert cli_train.default_checkpoint(str(tmp_path / "lens")) == checkpoint
    assert f"state saved in {checkpoint}" in capsys.readouterr().err and not (tmp_path / "lens").exists()
    monkeypatch.setattr(train_lens, "tuned_lens_losses", real)
    assert cli.main(line) == 0
    assert "step 2 of 4 restored" in capsys.readouterr().err
    straight, resumed = TunedLens.load(tmp_path / "straight"), TunedLens.load(tmp_path / "lens")
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not checkpoint.exists()  # the lens is saved: its state is gone
    assert json.loads((tmp_path / "lens" / "config.json").read_text()) == straight.config
    assert any(p.abs().sum() > 0 for p in resumed.parameters())  # trained: equality is not of two zero lenses
