"""Messages that named nnsight's internals now name the fix (issue 30): an in-trace verb called outside a trace,
``remote=True`` on a model NDIF cannot load or without an API key (refused before any request), and a generation
that ends at its end-of-text token (where it stopped, instead of nnsight's "was never reached ... cut short")."""

import warnings

import nnsight
import pytest
from tiny_models import random_tokens, tiny_model

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends.nnsight import _run
from lens_plugins.core.errors import LensValueError, RemoteLensError

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    return lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)


@pytest.mark.parametrize("verb", [
    lambda model: lp.nnsight.logit_lens(model),
    lambda model: lp.nnsight.logit_diff(model, 5, 6),
    lambda model: lp.nnsight.attribution(model, 5, 6),
    lambda model: lp.nnsight.attention(model),
], ids=["logit_lens", "logit_diff", "attribution", "attention"])
def test_an_in_trace_verb_outside_a_trace_names_the_fix(tiny, verb):
    with pytest.raises(LensValueError, match=r"inside `with model.trace\(prompt\):`.*lp\.nnsight\.run_logit_lens") as caught:
        verb(tiny)
    assert "interleaving" not in str(caught.value)
    with tiny.trace(random_tokens(1, 5)):  # inside a trace the same call works
        saved = lp.nnsight.logit_lens(tiny, top_k=2)
    assert lp.nnsight.logit_lens_result(saved, tiny).top_ids.shape[-1] == 2


@pytest.fixture
def public_ndif(monkeypatch):
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", "https://api.ndif.us")
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)


def test_remote_on_a_local_directory_is_refused_before_any_request(smollm2_hf, public_ndif, monkeypatch):
    hf, tokenizer = smollm2_hf
    model = lpn.wrap_model(hf, tokenizer)
    assert model.repo_id == hf.config.name_or_path and "/" in model.repo_id  # the converted model's directory
    sent = []
    monkeypatch.setattr(type(model), "trace", lambda *a, **k: sent.append(k) or pytest.fail("a request was made"))
    for call in (lambda: lp.nnsight.run_logit_lens(model, PROMPT, remote=True),
                 lambda: lp.nnsight.run_attribution(model, PROMPT, " Paris", remote=True)):
        with pytest.raises(RemoteLensError, match=r"local directory .*which NDIF cannot load.*remote_model\(.*remote=False"):
            call()
    assert sent == []


def test_remote_without_an_api_key_is_refused(tiny, public_ndif, monkeypatch):
    monkeypatch.setattr(tiny, "repo_id", "meta-llama/Llama-3.1-8B", raising=False)
    with pytest.raises(RemoteLensError, match="needs an NDIF API key.*NDIF_API_KEY.*set_default_api_key"):
        lp.nnsight.run_logit_lens(tiny, PROMPT, remote=True)  # refused before it tokenizes
    with pytest.raises(RemoteLensError, match="needs an NDIF API key"):
        lp.nnsight.run_generation_lens(tiny, PROMPT, max_new_tokens=2, remote=True)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", "a-key")
    _run.check_remote(tiny, True, None)  # a hosted id and a key: nothing to refuse here


def test_a_server_of_your_own_is_not_preflighted(tiny, monkeypatch):
    """``make ndif-up`` serves a local directory with no API key: both must pass."""
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", "http://127.0.0.1:18001")
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    monkeypatch.setattr(tiny, "repo_id", "/models/SmolLM2-135M-Instruct", raising=False)
    _run.check_remote(tiny, True, None)
    _run.check_remote(tiny, "local", None)  # nnsight's serialisation, run locally: never checked


@pytest.mark.slow
def test_dola_at_its_end_of_text_says_where_it_stopped(smollm2_hf):
    """docs/dola.md: ' Paris.<|im_end|>' in 3 of 8 tokens; no "cut short" warning from nnsight."""
    model = lpn.wrap_model(*smollm2_hf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = lp.nnsight.run_dola(model, PROMPT, max_new_tokens=8, layers="high", repetition_penalty=1.2)
    messages = [str(w.message) for w in caught]
    assert out.text == " Paris.<|im_end|>" and len(out.generated_ids) == 3
    assert [m for m in messages if "cut short" in m or "never reached" in m] == [], messages
    assert [m for m in messages if m.startswith("DoLa stopped")] == [
        "DoLa stopped after 3 of max_new_tokens=8 tokens at '<|im_end|>', a token that ends generation: a normal end "
        "of text; the result holds every step that ran"]
    with warnings.catch_warnings(record=True) as caught:  # a generation that runs to max_new_tokens: no warning
        warnings.simplefilter("always")
        lp.nnsight.run_dola(model, PROMPT, max_new_tokens=2, layers="high")
    assert [str(w.message) for w in caught if "stopped" in str(w.message)] == []
