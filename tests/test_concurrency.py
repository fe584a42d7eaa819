"""Concurrent use of one model (issue 25, defect 4): TransformerLens hooks are global to the model and nnsight's
tracing state is per model, so two threads calling the one-call verbs on one model used to read each other's
activations (21 of 80 TransformerBridge lens calls came back with another call's numbers, without an error)
or fail inside nnsight. Every one-call verb now holds the model's lock (``backends._common.one_at_a_time``):
threads give exactly the sequential results; processes, each with its own copy, give the in-process ones."""

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import lens_plugins as lp
from tiny_models import tiny_model

# Single SmolLM2 tokens below the tiny models' 1000-id vocabulary, so text prompts stay in range.
WORDS = " the of and to in is that for on with as it be at by this are from".split()
PROMPTS = [" " + " ".join(WORDS[(5 * i + 3 * j) % len(WORDS)] for j in range(3 + i % 4)) for i in range(8)]
TARGET = " the of and is"  # a Patchscope target prompt in range (the default identity prompt is not)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lens_plugins.models import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def models(tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    from lens_plugins.backends.nnsight import wrap_model

    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"), tokenizer=tokenizer)
    return {"transformer_lens": bridge.eval(), "nnsight": wrap_model(tiny_model("llama"), tokenizer)}


def verbs(backend):
    """One call of every one-call verb that runs a causal model (the DecoderLens takes an encoder-decoder)."""
    b = getattr(lp, backend)
    return [
        lambda m, p: b.run_logit_lens(m, p),
        lambda m, p: b.run_logit_diff(m, p, " the", " of"),
        lambda m, p: b.run_attribution(m, p, " the", " of"),
        lambda m, p: b.run_attention(m, p),
        lambda m, p: b.run_generation_lens(m, p, max_new_tokens=2),
        lambda m, p: b.run_dola(m, p, max_new_tokens=2),
        lambda m, p: b.run_patchscope(m, p, layers=[0, 2], target_prompt=TARGET),
    ]


def assert_same(got, expected, where="result"):
    """Bit-for-bit equality of two results, field by field (NaN, which marks what scores nothing, equals NaN)."""
    if dataclasses.is_dataclass(expected):
        assert type(got) is type(expected), where
        for field in dataclasses.fields(expected):
            assert_same(getattr(got, field.name), getattr(expected, field.name), f"{where}.{field.name}")
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=f"{where} differs")
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for index, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, f"{where}[{index}]")
    elif isinstance(expected, float) and expected != expected:
        assert got != got, where
    else:
        assert got == expected, where


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_two_threads_on_one_model_give_the_sequential_results(backend, models):
    model = models[backend]
    calls = [(verb, prompt) for prompt in PROMPTS for verb in verbs(backend)]
    expected = [verb(model, prompt) for verb, prompt in calls]
    got, errors = [None] * len(calls), []
    start = threading.Barrier(2)

    def worker(first):
        start.wait()  # both threads start together, so their calls overlap
        for index in range(first, len(calls), 2):
            verb, prompt = calls[index]
            try:
                got[index] = verb(model, prompt)
            except Exception as error:  # noqa: BLE001 - collected and asserted below
                errors.append(f"call {index}: {error!r}")

    threads = [threading.Thread(target=worker, args=(first,)) for first in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for index, (result, reference) in enumerate(zip(got, expected)):
        assert_same(result, reference, f"call {index} ({PROMPTS[index // len(verbs(backend))]!r})")


def test_the_lock_is_the_models_and_reentrant(models):
    from lens_plugins.backends._common import model_lock, unwrap

    wrapped = models["nnsight"]
    lock = model_lock(wrapped)
    assert model_lock(unwrap(wrapped)) is lock  # a wrapper and its module share one lock
    assert model_lock(models["transformer_lens"]) is not lock
    with lock:  # a verb that holds it can call another verb
        lp.nnsight.run_logit_lens(wrapped, PROMPTS[0])


CHILD = """
import dataclasses, sys, torch
import lens_plugins as lp
from lens_plugins.models import load_default_model
path, out, prompts = sys.argv[1], sys.argv[2], sys.argv[3:]
saved = {}
for backend in ("transformer_lens", "nnsight"):
    model = load_default_model(backend, path=path)
    for prompt in prompts:
        result = getattr(lp, backend).run_logit_lens(model, prompt)
        for field in dataclasses.fields(result):
            value = getattr(result, field.name)
            if isinstance(value, torch.Tensor):
                saved[f"{backend}|{prompt}|{field.name}"] = value
torch.save(saved, out)
"""


def test_two_processes_on_one_saved_model_give_the_in_process_results(tmp_path, tokenizer):
    """The way to run in parallel: a process per model copy, all reading one saved directory."""
    from lens_plugins.models import load_default_model

    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    root = Path(lp.__file__).resolve().parents[1]  # the children import this checkout's lens_plugins
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    halves = {tmp_path / f"out{k}.pt": PROMPTS[k:4:2] for k in (0, 1)}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(model_dir), str(out), *prompts], env=env,
                                 stderr=subprocess.PIPE, text=True) for out, prompts in halves.items()]
    for child in children:
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
    for backend in ("transformer_lens", "nnsight"):
        model = load_default_model(backend, path=model_dir)
        for out, prompts in halves.items():
            saved = torch.load(out, weights_only=True)
            for prompt in prompts:
                result = getattr(lp, backend).run_logit_lens(model, prompt)
                fields = {f.name for f in dataclasses.fields(result) if isinstance(getattr(result, f.name), torch.Tensor)}
                assert {key.split("|")[2] for key in saved if key.startswith(f"{backend}|{prompt}|")} == fields
                for name in fields:
                    assert_same(saved[f"{backend}|{prompt}|{name}"], getattr(result, name), f"{backend} {prompt!r} {name}")
