"""Issue 25, defect 9: one tokenization rule (``prepend_bos``) on every one-call form of both backends.

TransformerLens's one-call forms used to prepend BOS (``to_tokens``) and nnsight's did not, so the same prompt
gave P(" Paris") = 0.749 on one and 0.773 on the other. ``backends._common.prompt_ids`` is now the one rule:
``None`` is the model's own Hugging Face tokenizer, ``True`` exactly one BOS, ``False`` none.
"""

import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends import transformer_lens as tl_adapter
from lens_plugins.backends._common import prompt_ids
from tiny_models import tiny_model

PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]  # SmolLM2's tokenizer, which adds no BOS
BOS = 1  # SmolLM2's bos_token '<|im_start|>'
TINY_PROMPT = "in it is the"  # ids under the tiny models' 1000-token vocabulary
TOL = 1e-4  # as tests/test_backends.py: the same weights through two forward codes
SETTINGS = (None, True, False)


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer saved with ``add_bos_token=True`` in its files (as Llama's are), loaded from them:
    offline, and what TransformerLens's reloaded copy and ``hf_tokenizer``'s reload of the files agree on."""
    from transformers import AutoTokenizer

    from lens_plugins.models import default_model_dir

    directory = tmp_path_factory.mktemp("bos_tokenizer")
    AutoTokenizer.from_pretrained(default_model_dir(), add_bos_token=True).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer(PROMPT)["input_ids"] == [BOS] + PROMPT_IDS
    return tokenizer


@pytest.fixture(scope="module")
def smollm2_nnsight(smollm2_hf):
    return lpn.wrap_model(*smollm2_hf)


# --- the rule ---------------------------------------------------------------------------------------------


def test_the_rule_on_a_tokenizer_that_adds_no_bos(smollm2_tokenizer):
    assert prompt_ids(smollm2_tokenizer, PROMPT, None) == PROMPT_IDS
    assert prompt_ids(smollm2_tokenizer, PROMPT, True) == [BOS] + PROMPT_IDS
    assert prompt_ids(smollm2_tokenizer, PROMPT, False) == PROMPT_IDS
    # A BOS the text spells (a chat template's) is the text's: kept by False, not doubled by True.
    spelled = "<|im_start|>" + PROMPT
    assert prompt_ids(smollm2_tokenizer, spelled, False) == [BOS] + PROMPT_IDS
    assert prompt_ids(smollm2_tokenizer, spelled, True) == [BOS] + PROMPT_IDS


def test_the_rule_on_a_tokenizer_that_adds_bos(bos_tokenizer):
    assert prompt_ids(bos_tokenizer, PROMPT, None) == [BOS] + PROMPT_IDS
    assert prompt_ids(bos_tokenizer, PROMPT, True) == [BOS] + PROMPT_IDS
    assert prompt_ids(bos_tokenizer, PROMPT, False) == PROMPT_IDS
    # The tokenizer's BOS goes, the one the text spells stays.
    assert prompt_ids(bos_tokenizer, "<|im_start|>" + PROMPT, False) == [BOS] + PROMPT_IDS


def test_true_is_refused_where_the_tokenizer_has_no_bos_token(smollm2_tokenizer):
    import copy

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.bos_token = None
    with pytest.raises(lp.LensError, match=r"prepend_bos=True, but the tokenizer .* has no bos_token: pass "
                                           r"prepend_bos=None .* or prepend_bos=False"):
        prompt_ids(tokenizer, PROMPT, True)
    assert prompt_ids(tokenizer, PROMPT, False) == PROMPT_IDS == prompt_ids(tokenizer, PROMPT, None)


# --- the same prompt, the same ids and the same numbers on both backends ----------------------------------


@pytest.mark.parametrize("prepend_bos, p_paris", [(None, 0.7725), (True, 0.7491), (False, 0.7725)])
def test_smollm2_gives_one_answer_on_both_backends(smollm2_bridge, smollm2_nnsight, prepend_bos, p_paris):
    """The defect's numbers: 0.749 (TransformerLens, BOS) against 0.773 (nnsight, none) for the same call;
    now each setting is one answer, and the first row to put " Paris" on top is the same row."""
    expected = ([BOS] if prepend_bos else []) + PROMPT_IDS
    results = [backend.run_logit_lens(model, PROMPT, targets=[" Paris"], prepend_bos=prepend_bos)
               for backend, model in ((tl_adapter, smollm2_bridge), (lpn, smollm2_nnsight))]
    for result in results:
        assert result.token_ids.tolist() == [expected]
        assert float(result.target_logprobs[-1, 0, -1, 0].exp()) == pytest.approx(p_paris, abs=5e-4)
    tl, nn = results
    assert torch.equal(tl.top_ids, nn.top_ids)
    torch.testing.assert_close(tl.top_logprobs, nn.top_logprobs, atol=TOL, rtol=0)
    paris = smollm2_bridge.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    first = [int((r.top_ids[:, 0, -1, 0] == paris).nonzero()[0]) for r in results]
    assert first[0] == first[1]
    assert tl.labels[first[0]] == ("28_pre" if prepend_bos else "29_post")


@pytest.mark.parametrize("prepend_bos", SETTINGS)
def test_attribution_orders_agree(smollm2_bridge, smollm2_nnsight, prepend_bos):
    tl = tl_adapter.run_attribution(smollm2_bridge, PROMPT, " Paris", " London", prepend_bos=prepend_bos)
    nn = lpn.run_attribution(smollm2_nnsight, PROMPT, " Paris", " London", prepend_bos=prepend_bos)
    torch.testing.assert_close(tl.values, nn.values, atol=1e-3, rtol=0)
    assert tl.values[0].argsort().tolist() == nn.values[0].argsort().tolist()


# --- a tokenizer that adds BOS: both backends, batches and padding ----------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(bos_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"),
                                                 tokenizer=bos_tokenizer).eval()
    return bridge, lpn.wrap_model(tiny_model("llama"), bos_tokenizer)


@pytest.mark.parametrize("prepend_bos", SETTINGS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_runs_the_rules_ids_on_both_backends(tiny_pair, bos_tokenizer, prepend_bos, side):
    prompts = [TINY_PROMPT, "in it"]
    expected = [prompt_ids(bos_tokenizer, p, prepend_bos) for p in prompts]
    assert [ids[:1] == [BOS] for ids in expected] == [prepend_bos is not False] * 2
    results = [backend.run_logit_lens(model, prompts, prepend_bos=prepend_bos, padding_side=side)
               for backend, model in zip((tl_adapter, lpn), tiny_pair)]
    for result in results:
        ran = [ids[mask.bool()].tolist() for ids, mask in zip(result.token_ids, result.attention_mask)]
        assert ran == expected
        assert (result.attention_mask[1, 0] == 0) == (side == "left")
    tl, nn = results
    assert torch.equal(tl.top_ids, nn.top_ids)
    torch.testing.assert_close(tl.entropy, nn.entropy, atol=TOL, rtol=0, equal_nan=True)


def test_every_one_call_form_takes_the_rule(tiny_pair, bos_tokenizer):
    """Generation, DoLa, attention and both prompts of a Patchscope run the rule's ids on both backends."""
    without = prompt_ids(bos_tokenizer, TINY_PROMPT, False)
    target = prompt_ids(bos_tokenizer, "in the", False)
    assert len(without) == 4 and len(target) == 2  # the tokenizer's BOS is gone
    for backend, model in zip((tl_adapter, lpn), tiny_pair):
        generated = backend.run_generation_lens(model, TINY_PROMPT, max_new_tokens=2, prepend_bos=False)
        assert generated.token_ids[0, :generated.prompt_length].tolist() == without
        dola = backend.run_dola(model, TINY_PROMPT, max_new_tokens=2, prepend_bos=False)
        assert dola.token_ids[:dola.prompt_length].tolist() == without
        attention = backend.run_attention(model, TINY_PROMPT, [0], prepend_bos=False)
        assert attention.token_ids[0].tolist() == without
        scope = backend.run_patchscope(model, TINY_PROMPT, layers=[0], positions=[-1], target_prompt="in the",
                                       prepend_bos=False)
        assert scope.token_ids[0].tolist() == without and scope.target_token_ids.tolist() == target


def test_the_repr_shows_the_tokens_that_ran(smollm2_bridge):
    result = tl_adapter.run_logit_lens(smollm2_bridge, PROMPT, prepend_bos=True, top_k=1)
    assert "tokens=['<|im_start|>', 'The', ' capital', ' of', ' France', ' is']" in repr(result)
    result = tl_adapter.run_logit_lens(smollm2_bridge, PROMPT + " a city", top_k=1)
    assert "tokens=['The', ' capital', ' of', ' France', ' is', ' a', ... 7 tokens]" in repr(result)


def test_the_report_and_the_cli_take_prepend_bos(smollm2_bridge, tmp_path, monkeypatch):
    from lens_plugins.cli import main as cli
    from lens_plugins.methods import report

    written = {}
    monkeypatch.setattr(report, "write_report", lambda path, lens, *a, **k: written.setdefault("ids", lens.token_ids))
    report.run_report(smollm2_bridge, PROMPT, tmp_path / "r.html", prepend_bos=True)
    assert written["ids"].tolist() == [[BOS] + PROMPT_IDS]
    assert cli.build_parser().parse_args([PROMPT]).prepend_bos is None
    assert cli.build_parser().parse_args([PROMPT, "--prepend-bos"]).prepend_bos is True
    assert cli.build_report_parser().parse_args([PROMPT, "--no-prepend-bos"]).prepend_bos is False
