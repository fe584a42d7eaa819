"""The lens over generated text: nnsight's per-step lens inside ``model.generate`` against the
teacher-forced lens of prompt + continuation, on nnsight itself and on TransformerLens."""

import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends import transformer_lens as tl_adapter
from lens_plugins.methods.generation import GeneratedLens
from tiny_models import tiny_model

PROMPT = torch.tensor([[5, 17, 300, 42, 7]])
STEPS = 6
# Same residuals, computed with a key-value cache (per step) or in one pass (teacher forced): they differ
# by float32 rounding of differently shaped matmuls, a few ulps of values of order 1-10.
TOL = 1e-4
FLOAT_FIELDS = ("top_logprobs", "entropy", "kl_final_row", "kl_row_final", "js_final", "final_top1_logprob",
                "next_token_logprob", "input_token_logprob", "target_logprobs", "log_partition")
EXACT_FIELDS = ("top_ids", "final_top1", "final_top1_rank", "next_token_rank", "input_token_rank", "target_ranks",
                "token_ids")
REDUCTIONS = ("top_k", "entropy", "kl_final_row", "kl_row_final", "js_final", "final_top1", "next_token", "input_token")


def assert_same(ours, theirs):
    assert ours.labels == theirs.labels and ours.positions == theirs.positions
    for name in EXACT_FIELDS:
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    for name in FLOAT_FIELDS:
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=TOL, rtol=0, equal_nan=True,
                                   msg=name)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def per_step(family, smollm2_tokenizer):
    model = lpn.wrap_model(tiny_model(family), smollm2_tokenizer)
    return model, lpn.run_generation_lens(model, PROMPT, max_new_tokens=STEPS, top_k=4, targets=[17],
                                          reductions=REDUCTIONS, min_new_tokens=STEPS)


def test_columns_are_the_generated_tokens(family, per_step):
    model, lens = per_step
    hf = model._module
    expected = hf.generate(PROMPT, do_sample=False, max_new_tokens=STEPS, min_new_tokens=STEPS)
    assert torch.equal(lens.token_ids, expected)
    assert lens.positions == list(range(PROMPT.shape[1] - 1, PROMPT.shape[1] + STEPS - 1))
    assert lens.generated_ids() == expected[0, PROMPT.shape[1]:].tolist()
    # Greedy: the final row's top-1 is the generated token, ranked 1 as the position's next token.
    assert lens.final_top1[0].tolist() == lens.generated_ids()
    assert (lens.next_token_rank[-1] == 1).all()
    labels = lens.column_labels()
    assert len(labels) == STEPS and labels[0].endswith(f"[{PROMPT.shape[1]}]")
    assert list(lens.plot().data[0].x) == labels


def test_per_step_equals_teacher_forced_nnsight(family, per_step):
    model, lens = per_step
    with model.trace(lens.token_ids):
        forced = lpn.logit_lens(model, top_k=4, targets=[17], positions=lens.positions, reductions=REDUCTIONS)
    assert_same(lens, lpn.logit_lens_result(forced, model))


def test_per_step_equals_transformer_lens(family, per_step, smollm2_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(f"tiny-{family}", hf_model=tiny_model(family),
                                                 tokenizer=smollm2_tokenizer).eval()
    _, lens = per_step
    theirs = tl_adapter.run_generation_lens(bridge, PROMPT, max_new_tokens=STEPS, top_k=4, targets=[17],
                                            reductions=REDUCTIONS)
    assert isinstance(theirs, GeneratedLens)
    assert theirs.prompt_length == lens.prompt_length
    assert_same(lens, theirs)


def test_refuses_a_batch_and_nothing_to_generate(smollm2_tokenizer):
    model = lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)
    with pytest.raises(ValueError, match=r"text as token ids must be one prompt of shape \[1, seq\]"):
        lpn.run_generation_lens(model, PROMPT.repeat(2, 1), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        lpn.run_generation_lens(model, PROMPT, max_new_tokens=0)


def test_generation_lens_in_a_remote_local_body(smollm2_tokenizer):
    """The in-trace verb as a user writes it, rehearsed through nnsight's serialisation (remote="local")."""
    model = lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, min_new_tokens=3, remote="local") as tracer:
        saved = lp.nnsight.generation_lens(model, tracer, 3, top_k=2)
    lens = lpn.generation_result(saved, model)
    assert lens.positions == [4, 5, 6] and (lens.next_token_rank[-1] == 1).all()


def test_row_selection_and_a_lens_follow_the_logit_lens(smollm2_tokenizer):
    """``layers`` / ``resid_mid`` / ``lens`` / ``token_sets`` mean what they mean for ``logit_lens``: the per-step
    lens of the chosen rows through an affine lens equals the teacher-forced lens with the same arguments."""
    model = lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)
    generator = torch.Generator().manual_seed(0)
    labels = ["embed", "0_mid", "1_mid", "2_mid", "2_post"]
    tuned = lp.AffineLens(labels, torch.randn(5, 64, 64, generator=generator) * 0.05,
                          torch.randn(5, 64, generator=generator) * 0.1)
    kwargs = dict(top_k=3, layers=["0_mid", "2_mid"], resid_mid=True, lens=tuned, token_sets={"s": [17, 300]},
                  reductions=REDUCTIONS)
    lens = lpn.run_generation_lens(model, PROMPT, max_new_tokens=4, min_new_tokens=4, **kwargs)
    assert lens.labels == ["0_mid", "2_mid", "2_post"]
    with model.trace(lens.token_ids):
        forced = lpn.logit_lens(model, positions=lens.positions, **kwargs)
    forced = lpn.logit_lens_result(forced, model)
    assert_same(lens, forced)
    torch.testing.assert_close(lens.set_logprobs, forced.set_logprobs, atol=TOL, rtol=0)
    with model.trace(lens.token_ids):
        plain = lpn.logit_lens(model, positions=lens.positions, **dict(kwargs, lens=None))
    assert not torch.allclose(lpn.logit_lens_result(plain, model).entropy, lens.entropy)  # the lens did change the rows


def test_positions_are_refused_on_both_backends(smollm2_tokenizer):
    """The generation lens decodes the generated positions; ``positions=`` used to reach ``model.generate`` on
    nnsight (a transformers warning about unused model_kwargs) while TransformerLens refused it."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"),
                                                 tokenizer=smollm2_tokenizer).eval()
    model = lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)
    for run, m in ((tl_adapter.run_generation_lens, bridge), (lpn.run_generation_lens, model)):
        with pytest.raises(ValueError, match="decodes the generated positions; it takes no positions="):
            run(m, PROMPT, max_new_tokens=2, positions=[0])


def test_a_lens_argument_in_the_wrong_case_is_refused_on_both_backends(smollm2_tokenizer):
    """``top_K=`` used to reach ``model.generate`` on nnsight (transformers: "model_kwargs are not used") and
    ``logit_lens`` on TransformerLens (a TypeError after generating): one ValueError naming the argument meant."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"),
                                                 tokenizer=smollm2_tokenizer).eval()
    model = lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)
    for run, m in ((tl_adapter.run_generation_lens, bridge), (lpn.run_generation_lens, model)):
        with pytest.raises(ValueError, match=r"the generation lens has no argument top_K=; did you mean top_k=\?"):
            run(m, PROMPT, max_new_tokens=2, top_K=3)
        with pytest.raises(ValueError, match=r"no argument Targets=; did you mean targets=\?"):
            run(m, PROMPT, max_new_tokens=2, Targets=[17])
    lens = lpn.run_generation_lens(model, PROMPT, max_new_tokens=2, min_new_tokens=2, top_p=1.0)  # generate's own
    assert lens.top_ids.shape[-1] == 5
