"""``progress=`` (``lens_plugins.progress``): off by default, nothing on stderr; on, a tqdm bar that counts the
call's own units to the end (blocks, pairs, tokens, steps), and the same numbers either way. Tiny random models."""

import re

import pytest
import torch

import lens_plugins.nnsight as lpn
from lens_plugins import progress
from lens_plugins.core.errors import LensValueError
from lens_plugins.lenses.affine import LogitLens
from lens_plugins.methods.evaluate import evaluate_lenses
from tiny_models import VOCAB, tiny_model


def _bar(err: str, description: str) -> str:
    """The bar's final line (tqdm redraws with carriage returns)."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith(description)]
    assert lines, f"no {description!r} bar in {err!r}"
    return lines[-1]


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    """The same tiny Llama weights behind both backends."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"),
                                                 tokenizer=smollm2_tokenizer).eval()
    return bridge, lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)


def test_the_silent_bar_and_the_real_one(capsys):
    with progress.bar(False, 3, "quiet", "thing") as shown:
        shown.update(3)
    assert capsys.readouterr().err == ""
    with progress.bar(True, 3, "loud", "thing") as shown:
        shown.update(3)
    assert "3/3" in _bar(capsys.readouterr().err, "loud")


def test_evaluate_lenses(capsys):
    hf = tiny_model("llama")
    blocks = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    quiet = evaluate_lenses(hf, blocks, [LogitLens()], vocab_chunk=256)
    assert capsys.readouterr().err == ""
    loud = evaluate_lenses(hf, blocks, [LogitLens()], vocab_chunk=256, progress=True)
    line = _bar(capsys.readouterr().err, "evaluating lenses")
    assert "100%" in line and "3/3" in line and "block" in line
    assert torch.equal(quiet.kl, loud.kl) and torch.equal(quiet.cross_entropy, loud.cross_entropy)


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_patchscope_counts_pairs(tiny, backend, capsys):
    model = tiny[0] if backend == "transformer_lens" else tiny[1]
    run = (__import__("lens_plugins").transformer_lens if backend == "transformer_lens" else lpn).run_patchscope
    source, target = torch.tensor([[5, 17, 300, 42]]), torch.tensor([11, 12, 13])
    kwargs = dict(target_prompt=target, layers=[1, 2], positions=[1, 3], batch_size=3)
    quiet = run(model, source, **kwargs)
    assert capsys.readouterr().err == ""
    loud = run(model, source, progress=True, **kwargs)
    pairs = len(loud.labels) * len(loud.positions)  # the final row is always kept: 3 rows x 2 positions
    line = _bar(capsys.readouterr().err, "patchscope")
    assert f"{pairs}/{pairs}" in line and "pair" in line
    assert torch.equal(quiet.top_ids, loud.top_ids)


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_generation_lens_counts_tokens(tiny, backend, capsys):
    model = tiny[0] if backend == "transformer_lens" else tiny[1]
    run = (__import__("lens_plugins").transformer_lens if backend == "transformer_lens" else lpn).run_generation_lens
    prompt = torch.tensor([[5, 6, 7]])
    quiet = run(model, prompt, max_new_tokens=4)
    assert capsys.readouterr().err == ""
    loud = run(model, prompt, max_new_tokens=4, progress=True)
    line = _bar(capsys.readouterr().err, "generation lens")
    assert "4/4" in line and "token" in line
    assert quiet.generated_ids() == loud.generated_ids() and len(loud.generated_ids()) == 4


def test_a_remote_generation_refuses_a_local_bar(tiny):
    with pytest.raises(LensValueError, match="remote generation runs on the server"):
        lpn.run_generation_lens(tiny[1], torch.tensor([[5, 6, 7]]), max_new_tokens=2, remote=True, progress=True)


def test_tuned_lens_fit_counts_steps(capsys):
    from lens_plugins.training.tuned_lens import train_tuned_lens

    hf = tiny_model("llama")
    blocks = torch.randint(3, VOCAB, (16, 8), generator=torch.Generator().manual_seed(1))
    train_tuned_lens(hf, blocks, steps=3, batch_size=4, vocab_chunk=256)
    assert capsys.readouterr().err == ""
    train_tuned_lens(hf, blocks, steps=3, batch_size=4, vocab_chunk=256, progress=True)
    assert "3/3" in _bar(capsys.readouterr().err, "tuned lens")


def test_jacobian_lens_fit_counts_prompts(tiny, capsys):
    from lens_plugins.lenses.jacobian import JacobianLens

    prompts = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    quiet = JacobianLens.fit(tiny[1], prompts, skip_first=1, source_layers=[0])
    assert capsys.readouterr().err == ""
    loud = JacobianLens.fit(tiny[1], prompts, skip_first=1, source_layers=[0], progress=True)
    assert "3/3" in _bar(capsys.readouterr().err, "fitting the Jacobian lens")
    assert torch.equal(quiet.jacobians[0], loud.jacobians[0])
