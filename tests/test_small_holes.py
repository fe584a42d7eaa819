"""Issue 25, item 11: the smaller holes, each refused (or rendered) where it used to fail deep in a library,
name nothing, or return a number about padding.

a. ``logit_diff`` on a padded batch scored pad tokens; positions that are padding in some prompt are refused.
b. A non-NDIF HTTP reply (a wrong ``nnsight.CONFIG.API.HOST``) surfaced as a raw websocket error.
c. The HTML "Prompt:" line let right-to-left text reorder the prompt around it.
d. One bad call gave one of three type errors at random (beartype samples one list item), some with a model dump.
e. A hostile ``config.json`` failed without naming the file, or hung building 1e8 layers.
f. Out-of-vocabulary token ids, wrongly shaped lens tensors and meta-device models crashed deep in torch.
"""

import contextlib
import http.server
import json
import shutil
import threading

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import lens_plugins as lp
from lens_plugins.errors import LensTypeError, LensValueError, RemoteLensError

BACKENDS = ["transformer_lens", "nnsight"]
RAGGED = ["in it in it in it", "in"]  # ids below the tiny models' 1,000-token vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lens_plugins.models import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def models(tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    from lens_plugins.backends.nnsight import wrap_model

    return {
        "transformer_lens": TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"),
                                                               tokenizer=tokenizer).eval(),
        "nnsight": wrap_model(tiny_model("llama"), tokenizer),
    }


def verbs(backend):
    return getattr(lp, backend)


# --- a. logit_diff on a padded batch ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_diff_refuses_positions_that_are_padding(models, backend):
    """Right padding makes the short prompt's later positions pad tokens: every position by default, and the
    last one, are refused with the prompt and the fix; before, both backends returned finite pad scores."""
    model = models[backend]
    with pytest.raises(LensValueError, match=r"position \d+ is padding in prompt 1 .*padding_side=.left."):
        verbs(backend).run_logit_diff(model, RAGGED, " in", " it", padding_side="right")
    with pytest.raises(LensValueError, match=r"position \d+ is padding in prompt 1 of the batch \(1 of the 1 positions"):
        verbs(backend).run_logit_diff(model, RAGGED, " in", " it", padding_side="right", positions=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_diff_on_real_positions_equals_each_prompt_alone(models, backend):
    """Left padding with ``positions=-1`` (every prompt's last token) is allowed, and each prompt's value is its
    value alone: the refusal stops only pad positions."""
    model = models[backend]
    batch = verbs(backend).run_logit_diff(model, RAGGED, " in", " it", padding_side="left", positions=-1)
    for item, prompt in enumerate(RAGGED):
        alone = verbs(backend).run_logit_diff(model, prompt, " in", " it", positions=-1)
        torch.testing.assert_close(batch.values[:, item], alone.values[:, 0], atol=1e-4, rtol=1e-4)


def test_cache_logit_diff_takes_the_mask(models):
    """``cache.lens.logit_diff`` cannot see padding in a cache; given the mask, it refuses as the one-call form."""
    model = models["transformer_lens"]
    from lens_plugins.backends.transformer_lens.reader import hook_filter, tokenize

    tokens, mask = tokenize(model, RAGGED, "right")
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=hook_filter(model))
    with pytest.raises(LensValueError, match="is padding in prompt 1"):
        lp.transformer_lens.logit_diff(cache, " in", " it", attention_mask=mask)


# --- b. a server that is not NDIF ---------------------------------------------------------------------------


class NotFound(http.server.BaseHTTPRequestHandler):
    def _not_found(self):
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<h1>Not Found</h1>")

    do_GET = do_POST = _not_found

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def host_answering_404():
    """``nnsight.CONFIG.API.HOST`` pointed at a local HTTP server that answers 404 to everything; restored after."""
    import nnsight

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    saved = nnsight.CONFIG.API.HOST
    nnsight.CONFIG.API.HOST = host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield host
    finally:
        nnsight.CONFIG.API.HOST = saved
        server.shutdown()
        server.server_close()


def test_a_non_ndif_http_reply_is_named_with_the_host():
    from lens_plugins.models import default_model_dir

    model = lp.nnsight.remote_model(str(default_model_dir()))  # weights stay on meta: nothing runs here
    with host_answering_404() as host, pytest.raises(RemoteLensError) as caught:
        lp.nnsight.run_logit_lens(model, "The capital of France is", remote=True)
    message = str(caught.value)
    assert f"the server at {host} did not answer as an NDIF server (HTTP 404" in message
    assert "nnsight.CONFIG.API.HOST" in message


# --- c. right-to-left prompts in the HTML -------------------------------------------------------------------

RTL = ["The", " word", " שלום"]  # mixed direction: a Latin start, then Hebrew


def rtl_result(model):
    """A lens result whose three tokens ("in it" with its BOS) read as ``RTL``: the pages write the prompt
    from the result's tokens."""
    result = lp.transformer_lens.run_logit_lens(model, "in it", prepend_bos=True)
    assert result.token_ids.shape[1] == len(RTL)
    result.str_tokens = lambda batch=0: list(RTL)
    return result


def test_html_report_isolates_the_prompt(models, tmp_path):
    page = lp.html_report(rtl_result(models["transformer_lens"]), tmp_path / "lens.html", metrics=["prob"]).read_text()
    assert "Prompt: <bdi><code>The word שלום</code></bdi>" in page


def test_report_isolates_the_prompt_and_each_token(models, tmp_path):
    from lens_plugins.methods.report import write_report

    page = write_report(tmp_path / "report.html", rtl_result(models["transformer_lens"])).read_text()
    assert "Prompt: <bdi><code>The word שלום</code></bdi>" in page
    assert "(3 tokens: The ·word \u2068·שלום\u2069)" in page  # each token already isolated (tokens.visible_text)


# --- d. one bad call, one readable message ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_argument_gives_one_short_message(models, backend):
    """A model inside the prompt list: beartype checks one list item at random, so this call failed three ways
    (a type error with the model's repr, a bare "Type-check error", or the prompt check) from one run to the
    next. Now every item is checked: one first line, the model named by its type."""
    model = models[backend]
    firsts = set()
    for _ in range(20):
        with pytest.raises(LensTypeError) as caught:
            verbs(backend).run_logit_lens(model, ["in", model])
        firsts.add(str(caught.value).split("\n")[0])
    assert len(firsts) == 1, firsts
    first = firsts.pop()
    assert len(first) < 300 and "argument 'prompt' has the wrong type" in first, first
    assert f"got a list of 2 items (str, {type(model).__name__})" in first and "(\n" not in first


@pytest.mark.parametrize("backend", BACKENDS)
def test_arguments_in_the_wrong_order_are_named(models, backend):
    """The prompt where the model goes used to raise a raw "cannot create weak reference to 'str' object"."""
    with pytest.raises(LensTypeError, match=r"the first argument must be the model .* got a str"):
        verbs(backend).run_logit_lens("in it", models[backend])


# --- e. a hostile config.json -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A copy of the default model's directory whose config the tests then damage."""
    from lens_plugins.models import default_model_dir

    target = tmp_path_factory.mktemp("model") / "m"
    shutil.copytree(default_model_dir(), target)
    return target


@pytest.fixture
def config_file(model_dir):
    file = model_dir / "config.json"
    original = file.read_text()
    yield file
    file.write_text(original)


def _set(file, **changes):
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda f: f.write_text('{"model_type": "llama",'), "is not valid JSON"),
    (lambda f: f.write_text("[1, 2]"), "holds a JSON list"),
    (lambda f: _set(f, model_type="evil"), "model_type 'evil'"),
    (lambda f: _set(f, num_hidden_layers=1e8), r"num_hidden_layers=100000000.0 .* integer from 1 to 4096"),
    (lambda f: _set(f, hidden_size=-576), r"hidden_size=-576"),
    (lambda f: _set(f, num_hidden_layers=31), "gives 31 layers, but model.safetensors holds weights for 30"),
])
def test_a_hostile_config_is_refused_naming_the_file(config_file, damage, problem):
    """Before, 1e8 layers made transformers build (then hang), and a broken file failed inside transformers
    without its name; every refusal now starts with the file's path, before any weight is read."""
    from lens_plugins.models import load_hf_model

    damage(config_file)
    with pytest.raises(LensValueError, match=problem) as caught:
        load_hf_model(config_file.parent)
    assert str(caught.value).startswith(f"{config_file}: ")


# --- f. token ids, lens tensors, meta weights ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("verb", ["run_generation_lens", "run_dola"])
def test_token_ids_outside_the_vocabulary_are_refused(models, backend, verb):
    ids = torch.tensor([[5, VOCAB + 7, 9]])
    with pytest.raises(LensValueError, match=rf"text holds token id {VOCAB + 7} at index \(0, 1\), outside "
                                             rf"the model's vocabulary \[0, {VOCAB}\)"):
        getattr(verbs(backend), verb)(models[backend], ids, max_new_tokens=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_ids_outside_the_vocabulary_are_refused(models, backend):
    """Already refused before this change (``request.single_token_id``, ``token_set``): pinned here."""
    with pytest.raises(LensValueError, match="outside the vocabulary"):
        verbs(backend).run_logit_lens(models[backend], "in it", targets=[VOCAB + 7])
    with pytest.raises(LensValueError, match="outside"):
        verbs(backend).run_logit_diff(models[backend], "in it", VOCAB + 7, " it")


@pytest.mark.parametrize(("weight", "bias", "problem"), [
    (torch.zeros(2, 4, 4), None, r"weight has shape \(2, 4, 4\), but 3 row label\(s\) need weight of shape \(3, 'd', 'd'\)"),
    (torch.zeros(3, 4, 5), None, r"weight has shape \(3, 4, 5\)"),
    (None, torch.zeros(3, 4, 4), r"bias has shape \(3, 4, 4\)"),
    (torch.zeros(3, 4, 4), torch.zeros(3, 5), "weight is 4 wide but bias is 5"),
])
def test_affine_lens_refuses_tensors_of_the_wrong_shape(weight, bias, problem):
    with pytest.raises(LensValueError, match=problem):
        lp.AffineLens(["embed", "0_pre", "0_post"], weight, bias)


def test_saved_future_lens_of_the_wrong_shape_names_the_file(tmp_path):
    from lens_plugins.lenses.future import FORMAT, FutureLens

    path = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "labels": ["embed", "0_pre"], "n_ahead": 2, "weight": torch.zeros(2, 4, 4),
                "bias": torch.zeros(3, 4)}, path)
    with pytest.raises(LensValueError, match=rf"{path}: bias has shape \(3, 4\), but 2 row label\(s\)"):
        FutureLens.load(path)


def test_meta_device_model_is_refused_where_the_verb_starts(tokenizer):
    """A TransformerLens model built on ``meta`` (no weights) failed on the first matmul deep in torch."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"), tokenizer=tokenizer)
    bridge.to("meta")
    for run in (lambda: lp.transformer_lens.run_logit_lens(bridge, "in it"),
                lambda: lp.transformer_lens.run_logit_diff(bridge, "in it", " in", " it")):
        with pytest.raises(LensValueError, match="weights are on the 'meta' device"):
            run()

