"""Requests that would run past the model's context are refused before any forward pass, with the same message
on both backends (issue 25, defects 5 and 8): the generation lens and DoLa (prompt + ``max_new_tokens``),
Patchscopes (the source prompt; the target prompt with its placeholder, plus any continuation) and the report
(which used to cut a long prompt to the context silently and exit 0).

Before, nnsight ran a rotary model past its context and GPT-2 failed deep in torch, TransformerLens refused
only after generating (naming the generated length as the prompt's), and neither checked a Patchscope's source."""

import contextlib

import pytest

import lens_plugins as lp
from lens_plugins.errors import LensError, LensValueError
from lens_plugins.backends.transformer_lens.reader import hf_tokenizer
from tiny_models import random_tokens, tiny_model

LIMIT = 128  # the tiny models' max_position_embeddings / n_positions
BACKENDS = ["transformer_lens", "nnsight"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lens_plugins.models import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def load(backend, family, tokenizer):
    """``(model, embedding)``: the model for ``backend`` and its Hugging Face input embedding, which every
    forward pass calls (taken before a bridge is booted around it)."""
    hf = tiny_model(family)
    embedding = hf.get_input_embeddings()
    if backend == "nnsight":
        from lens_plugins.backends.nnsight import wrap_model

        return wrap_model(hf, tokenizer), embedding
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(f"tiny-{family}", hf_model=hf, tokenizer=tokenizer).eval(), embedding


@pytest.fixture(scope="module")
def llama(tokenizer):
    return {backend: load(backend, "llama", tokenizer) for backend in BACKENDS}


@contextlib.contextmanager
def forwards(embedding):
    """The forward passes run inside the block, counted at the input embedding."""
    calls = []
    handle = embedding.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    try:
        yield calls
    finally:
        handle.remove()


def over(what, n_tokens, max_new_tokens=0):
    if max_new_tokens == 0:
        return (f"{what} is {n_tokens} tokens, longer than the model's context of {LIMIT} tokens: "
                f"shorten it (or split it) to at most {LIMIT} tokens")
    return (f"{what} is {n_tokens} tokens and max_new_tokens={max_new_tokens}: {n_tokens + max_new_tokens} tokens "
            f"in all, longer than the model's context of {LIMIT} tokens: shorten {what} or lower max_new_tokens "
            f"so that the two add up to at most {LIMIT}")


FIVE = random_tokens(1, 5)
# (entry point, a request past the context, its message, the same request just within it)
CASES = {
    "generation lens": (
        lambda b, m, n, new: b.run_generation_lens(m, random_tokens(1, n), max_new_tokens=new),
        (100, 40), over("the prompt", 100, 40), (126, 2)),
    "dola": (
        lambda b, m, n, new: b.run_dola(m, random_tokens(1, n), max_new_tokens=new),
        (100, 40), over("the prompt", 100, 40), (126, 2)),
    "patchscope source": (
        lambda b, m, n, new: b.run_patchscope(m, random_tokens(1, n), layers=[0], positions=[-1],
                                              target_prompt=FIVE[0]),
        (130, 0), over("the source prompt", 130), (128, 0)),
    "patchscope target": (
        lambda b, m, n, new: b.run_patchscope(m, FIVE, layers=[0], positions=[-1],
                                              target_prompt=random_tokens(1, n)[0], max_new_tokens=new),
        (130, 0), over("the target prompt", 130), (128, 0)),
    "patchscope target + generation": (
        lambda b, m, n, new: b.run_patchscope(m, FIVE, layers=[0], positions=[-1],
                                              target_prompt=random_tokens(1, n)[0], max_new_tokens=new),
        (100, 40), over("the target prompt", 100, 40), (126, 2)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_past_the_context_is_refused_before_any_forward(case, backend, llama):
    call, too_long, message, just_within = CASES[case]
    model, embedding = llama[backend]
    verbs = getattr(lp, backend)
    with forwards(embedding) as calls, pytest.raises(LensError) as refused:
        call(verbs, model, *too_long)
    assert isinstance(refused.value, ValueError) and str(refused.value) == message
    assert calls == []
    with forwards(embedding) as calls:  # the limit itself is allowed: prompt + max_new_tokens == context
        call(verbs, model, *just_within)
    assert calls and max(shape[-1] for shape in calls) <= LIMIT


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_generation_past_its_positions_is_a_lens_error(backend, tokenizer):
    """GPT-2's learned positions end at n_positions: past them nnsight failed in torch's embedding lookup."""
    model, embedding = load(backend, "gpt2", tokenizer)
    with forwards(embedding) as calls, pytest.raises(LensValueError) as refused:
        getattr(lp, backend).run_generation_lens(model, random_tokens(1, 120), max_new_tokens=10)
    assert str(refused.value) == over("the prompt", 120, 10) and calls == []


LONG = " the" * 150  # one token a word, past the context


def test_the_report_refuses_a_prompt_longer_than_the_context(llama, tmp_path):
    """It used to cut the prompt to the context without a word and write the report."""
    bridge, embedding = llama["transformer_lens"]
    n_tokens = len(hf_tokenizer(bridge)(LONG)["input_ids"])  # the one-call forms' ids: the model's tokenizer's
    assert n_tokens > LIMIT
    with pytest.raises(LensValueError) as plain:
        lp.transformer_lens.run_logit_lens(bridge, LONG)
    path = tmp_path / "report.html"
    with forwards(embedding) as calls, pytest.raises(LensValueError) as refused:
        lp.run_report(bridge, LONG, path)
    assert str(refused.value) == str(plain.value) == over("the prompt", n_tokens)
    assert calls == [] and not path.exists()
    lp.run_report(bridge, " the of and", path)  # a prompt within the context still makes its report
    assert path.stat().st_size > 0


def test_the_report_command_exits_non_zero_naming_the_limit(llama, tmp_path, monkeypatch, capsys):
    from lens_plugins.cli import main as cli

    bridge, _ = llama["transformer_lens"]
    monkeypatch.setattr(cli, "load_model", lambda path: bridge)
    path = tmp_path / "report.html"
    status = cli.main(["report", LONG, "-o", str(path)])
    n_tokens = len(hf_tokenizer(bridge)(LONG)["input_ids"])  # the one-call forms' ids: the model's tokenizer's
    err = capsys.readouterr().err
    assert status == 1 and err.splitlines()[-1] == f"lens-plugins: error: {over('the prompt', n_tokens)}"
    assert all(line.startswith("lens-plugins: running ") for line in err.splitlines()[:-1])  # status lines only
    assert not path.exists()
