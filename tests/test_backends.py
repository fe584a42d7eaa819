"""One shared suite of behaviours, each run on TransformerLens and on nnsight: the two backends share one
request, one row plan and one pipeline, so every option, check and default must behave the same.

Each test of a bug listed in issue 10 says which backend got it wrong before the one pipeline.
"""

import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends import transformer_lens as tl_adapter
from lens_plugins.backends.transformer_lens.reader import tokenize as tl_tokenize
from lens_plugins.core import architectures, lenses as core_lenses, rows as row_plan
from lens_plugins.core.trace import reader as trace_reader
from lens_plugins.methods.lens import DEFAULT_TOP_K, logit_lens_from_stack
from tiny_models import random_tokens, tiny_model

PROMPT = "in it is the"
TOKENS = random_tokens(batch=2, seq=6)
TOL = 1e-4  # TransformerLens and nnsight run the same weights through different forward code


def tiny_bridge(hf, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tokenizer).eval()


class TransformerLensBackend:
    name = "transformer_lens"

    def __init__(self, hf, tokenizer):
        self.model = tiny_bridge(hf, tokenizer)

    def lens(self, prompt, **kwargs):
        return tl_adapter.run_logit_lens(self.model, prompt, **kwargs)

    def diff(self, prompt, target, distractor, **kwargs):
        return tl_adapter.run_logit_diff(self.model, prompt, target, distractor, **kwargs)

    def attribution(self, prompt, target, distractor=None, **kwargs):
        return tl_adapter.run_attribution(self.model, prompt, target, distractor, **kwargs)

    def on_tokens(self, verb, tokens, *args, resid_mid=False, sublayers=False, **kwargs):
        """``verb`` ("logit_lens" / "logit_diff") on a cache of ``tokens``: given ids, the same on both backends."""
        _, cache = self.model.run_with_cache(tokens, names_filter=tl_adapter.hook_filter(self.model, resid_mid, sublayers))
        extra = {"tokens": tokens} if verb == "logit_lens" else {}
        return getattr(tl_adapter, verb)(cache, *args, resid_mid=resid_mid, sublayers=sublayers, **extra, **kwargs)

    def stack(self, prompt):
        """``(stack, labels, decoder, tokens)``: the residual stack this backend reads, and its decoder."""
        tokens, _ = tl_tokenize(self.model, prompt, None)  # the ids the one-call forms run
        _, cache = self.model.run_with_cache(tokens, names_filter=tl_adapter.hook_filter(self.model))
        stack, labels = tl_adapter.residual_stack(cache)
        return stack, labels, tl_adapter.decoder_for(self.model), tokens.cpu()


class NnsightBackend:
    name = "nnsight"

    def __init__(self, hf, tokenizer):
        self.model = lpn.wrap_model(hf, tokenizer)

    def lens(self, prompt, **kwargs):
        return lpn.run_logit_lens(self.model, prompt, **kwargs)

    def diff(self, prompt, target, distractor, **kwargs):
        return lpn.run_logit_diff(self.model, prompt, target, distractor, **kwargs)

    def attribution(self, prompt, target, distractor=None, **kwargs):
        return lpn.run_attribution(self.model, prompt, target, distractor, **kwargs)

    def on_tokens(self, verb, tokens, *args, **kwargs):
        with self.model.trace(tokens):
            saved = getattr(lpn, verb)(self.model, *args, **kwargs)
        return lpn.logit_lens_result(saved, self.model) if verb == "logit_lens" else lpn.logit_diff_result(saved, self.model)

    def stack(self, prompt):
        import nnsight

        model = self.model
        spec = architectures.resolve(model)
        plan = row_plan.plan(len(architectures.get_path(model, spec["layers"])))
        with model.trace(prompt):
            token_ids, _ = trace_reader.model_input(model)
            saved = nnsight.save((trace_reader.reader(model, spec)(plan).detach(), token_ids.cpu()))
        stack, tokens = saved
        return stack, [row.label for row in plan], lpn.decoder_for(model), tokens


BACKENDS = {"transformer_lens": TransformerLensBackend, "nnsight": NnsightBackend}
BACKEND_NAMES = tuple(BACKENDS)


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request, smollm2_tokenizer):
    return BACKENDS[request.param](tiny_model("llama"), smollm2_tokenizer)


@pytest.fixture(scope="module")
def both(smollm2_tokenizer):
    return {name: cls(tiny_model("llama"), smollm2_tokenizer) for name, cls in BACKENDS.items()}


def assert_close_results(a, b):
    assert a.labels == b.labels and a.positions == b.positions
    assert torch.equal(a.top_ids, b.top_ids)
    for name in ("top_logprobs", "entropy", "kl_final_row", "next_token_logprob"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=TOL, rtol=0, equal_nan=True, msg=name)


# --- the same defaults, options and checks on both --------------------------------------------------------


def test_same_top_k_default(backend):
    """Bug: top_k defaulted to 5 on TransformerLens and 10 on nnsight."""
    assert backend.lens(PROMPT).top_ids.shape[-1] == DEFAULT_TOP_K


@pytest.mark.parametrize("top_k", [0, -1])
def test_bad_top_k_is_refused(backend, top_k):
    """Bug: nnsight did not validate top_k (top_k=0 failed inside the trace with an IndexError)."""
    with pytest.raises(ValueError, match=rf"top_k must be a positive integer .*, got {top_k}"):
        backend.lens(PROMPT, top_k=top_k)


def test_precision_option_on_both_one_call_forms(backend):
    """The one-call forms take ``precision`` on both backends: bf16x3 keeps the float32 lens's top-1 wherever
    its margin over the runner-up exceeds bf16x3's error (~1e-5 relative; 1e-3 nats leaves a wide margin), and
    TF32 off CUDA is refused with the same message."""
    exact = backend.lens(PROMPT)
    split = backend.lens(PROMPT, precision="bf16x3")
    clear = (exact.top_logprobs[..., 0] - exact.top_logprobs[..., 1]) > 1e-3
    assert clear.any() and torch.equal(split.top_ids[..., 0][clear], exact.top_ids[..., 0][clear])
    torch.testing.assert_close(split.entropy, exact.entropy, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="tf32"):
        backend.lens(PROMPT, precision="tf32")


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_non_finite_residual_is_refused(value, kind, smollm2_tokenizer):
    """Bug: nnsight skipped the NaN/inf refusal. A poisoned MLP weight in layer 1 makes every row from
    '2_pre' on non-finite; both backends name that row."""
    for cls in BACKENDS.values():
        hf = tiny_model("llama")  # one each: booting a bridge rewires the HF module tree
        with torch.no_grad():
            hf.model.layers[1].mlp.down_proj.weight[0, 0] = value
        with pytest.raises(ValueError, match=r"residual stream contains (NaN|inf) at row '2_pre', batch item 0, "
                                             r"prompt position 0"):
            cls(hf, smollm2_tokenizer).lens(PROMPT)


def test_resid_mid_rows(both):
    """Bug: resid_mid existed only on TransformerLens."""
    tl, nn = (both[name].on_tokens("logit_lens", TOKENS, resid_mid=True, top_k=3) for name in BACKEND_NAMES)
    assert tl.labels == ["embed", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "2_post"]
    assert_close_results(tl, nn)


def test_row_selection(both):
    """Bug: layers= selected rows on TransformerLens but was a module path on nnsight."""
    results = [both[name].on_tokens("logit_lens", TOKENS, layers=[1, "2_pre"], top_k=3) for name in BACKEND_NAMES]
    assert results[0].labels == ["1_pre", "2_pre", "2_post"]  # the final row is always kept
    assert_close_results(*results)


def test_a_module_path_in_layers_says_where_paths_go(backend):
    with pytest.raises(ValueError, match=r"layers='model.layers' looks like a module path.*paths=\{'layers'"):
        backend.lens(PROMPT, layers="model.layers")
    with pytest.raises(KeyError, match=r"no row labelled '7_pre'"):
        backend.lens(PROMPT, layers=["7_pre"])


def test_logit_diff_agrees_and_is_the_lens_log_odds(both):
    """Bug: logit_diff existed only on TransformerLens."""
    tl, nn = (both[name].on_tokens("logit_diff", TOKENS, " the", [" it", " is"]) for name in BACKEND_NAMES)
    assert tl.labels == nn.labels == ["embed", "1_pre", "2_pre", "2_post"]
    torch.testing.assert_close(tl.values, nn.values, atol=TOL, rtol=0)
    # The same number from the lens itself: log P(target) - log P(set), both from one readout.
    lens = both["nnsight"].on_tokens("logit_lens", TOKENS, targets=[" the"], token_sets={"s": [" it", " is"]})
    torch.testing.assert_close(nn.values, lens.target_logprobs[..., 0] - lens.set_logprobs[..., 0],
                               atol=TOL, rtol=0)


def test_logit_diff_refuses_an_out_of_range_position(backend):
    """Bug: logit_diff wrapped an out-of-range position (p % n) on TransformerLens."""
    with pytest.raises(IndexError, match=r"position 9 is out of range for a prompt of \d+ tokens"):
        backend.diff(PROMPT, " the", " it", positions=[9])


@pytest.mark.parametrize("target, message", [(5000, r"target id 5000 is outside the vocabulary \[0, 1000\)"),
                                             ([" the", " the"], "names a token twice")])
def test_attribution_refuses_bad_token_ids(backend, target, message):
    """Bug: nnsight's attribution accepted out-of-vocabulary and duplicate token ids."""
    with pytest.raises(ValueError, match=message):
        backend.attribution(PROMPT, target)


def test_attribution_has_the_lens_guards(backend):
    """Bug: run_attribution lacked run_logit_lens's guards (context length, no truncation, padding)."""
    with pytest.raises(ValueError, match=r"the prompt is \d+ tokens, longer than the model's context of 128"):
        backend.attribution(" in" * 200, " the")
    with pytest.raises(ValueError, match=r"the prompt is empty"):
        backend.attribution("   ", " the")
    with pytest.raises(ValueError, match=r"position -1 is padding in prompt\(s\) \[1\]"):
        backend.attribution([PROMPT, "in"], " the", padding_side="right")
    result = backend.attribution(PROMPT, " the", " it")
    assert float(result.error.max()) < 1e-4


# --- the lens seam -----------------------------------------------------------------------------------


def random_affine(labels, d_model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(len(labels), d_model, d_model, generator=generator) * 0.05
    bias = torch.randn(len(labels), d_model, generator=generator) * 0.1
    return lp.AffineLens(labels, weight, bias)


def test_affine_lens_is_the_lens_of_the_transformed_stack(backend):
    stack, labels, decoder, tokens = backend.stack(PROMPT)
    lens = random_affine(labels, stack.shape[-1])
    ours = backend.lens(PROMPT, lens=lens, targets=[" the"])
    rows, batch, seq, d = stack.shape
    moved = core_lenses.apply_affine(stack.reshape(rows, batch * seq, d), lens.weight, lens.bias).reshape(stack.shape)
    theirs = logit_lens_from_stack(moved, labels, decoder, tokens, backend.model.tokenizer, targets=[" the"])
    for name in ("top_ids", "top_logprobs", "entropy", "kl_final_row", "target_logprobs", "target_ranks"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    plain = backend.lens(PROMPT, targets=[" the"])
    assert not torch.equal(ours.top_logprobs, plain.top_logprobs)  # the lens did something
    identity = backend.lens(PROMPT, lens=lp.LogitLens(), targets=[" the"])
    assert torch.equal(identity.top_logprobs, plain.top_logprobs)


def test_affine_lens_agrees_across_backends(both):
    labels = ["embed", "1_pre", "2_pre", "2_post"]
    lens = random_affine(labels, 64, seed=3)
    tl, nn = (both[name].on_tokens("logit_lens", TOKENS, lens=lens, top_k=3) for name in BACKEND_NAMES)
    assert_close_results(tl, nn)


class Doubling:
    """A lens with a transform and no affine form: it runs where its code runs, and only there."""

    def transform(self, resid, rows):
        return 2 * resid


def test_transform_lens_runs_locally_and_is_refused_remotely(both):
    nn = both["nnsight"]
    local = nn.lens(PROMPT, lens=Doubling(), top_k=3)
    stack, labels, decoder, tokens = nn.stack(PROMPT)
    theirs = logit_lens_from_stack(2 * stack, labels, decoder, tokens, nn.model.tokenizer, top_k=3)
    assert torch.equal(local.top_logprobs, theirs.top_logprobs)
    with pytest.raises(TypeError, match=r"Doubling has no affine\(rows, d_model\), so it cannot run in a remote trace"):
        nn.lens(PROMPT, lens=Doubling(), remote="local")


def test_affine_lens_ships_to_a_remote_trace(both):
    nn = both["nnsight"]
    lens = random_affine(["embed", "1_pre", "2_pre", "2_post"], 64, seed=5)
    local = nn.lens(PROMPT, lens=lens, top_k=3)
    simulated = nn.lens(PROMPT, lens=lens, top_k=3, remote="local")
    for name in ("top_ids", "top_logprobs", "entropy", "kl_final_row"):
        assert torch.equal(getattr(simulated, name), getattr(local, name)), name


# --- the same surface --------------------------------------------------------------------------------

SHARED_VERBS = ("logit_lens", "logit_diff", "attribution", "run_logit_lens", "run_logit_diff", "run_attribution",
                "decoder_for", "run_patchscope", "run_decoder_lens", "run_dola", "run_generation_lens",
                "run_attention", "run_jacobian_edit")
# What only one backend has: where its input comes from (a cache's tokens and mask; a trace's remote/backend and
# module paths), and ``by`` (an in-trace verb saves values; nnsight's ``attribution_result(saved, model, by=...)``
# takes it; the in-trace verb's ``neurons`` says whether to save the neuron split ``by="neuron"`` labels);
# ``blocking`` is a remote job's. ``padding_side`` is shared: both one-call forms take it.
BACKEND_SPECIFIC = {"tokens", "attention_mask", "remote", "backend", "paths", "kwargs", "by", "lens_kwargs",
                    "generate_kwargs", "neurons", "blocking"}


def test_both_backend_modules_export_the_same_verbs_with_the_same_parameters():
    import inspect

    for verb in SHARED_VERBS:
        assert verb in tl_adapter.__all__ and verb in lpn.__all__, verb
        params = []
        for module in (tl_adapter, lpn):
            signature = inspect.signature(inspect.unwrap(getattr(module, verb)))
            params.append({name: p.default for i, (name, p) in enumerate(signature.parameters.items())
                           if i > 0 and name not in BACKEND_SPECIFIC})
        if verb.startswith("run_"):  # TransformerLens forwards the rest to the cache verb as **kwargs
            assert set(params[0]) <= set(params[1]), verb
            params[1] = {k: v for k, v in params[1].items() if k in params[0]}
        if verb == "decoder_for":
            continue
        assert params[0] == params[1], verb


def test_a_badly_typed_option_is_explained_on_both_backends(backend):
    """A wrong type is named with the argument, on both backends, also where the TransformerLens one-call form
    forwards it through ``**kwargs`` to the cache form (its own signature does not have it: that used to
    surface as a ``KeyError``)."""
    from jaxtyping import TypeCheckError

    with pytest.raises(TypeCheckError, match=r"argument 'top_k' has the wrong type\. Expected int, got str"):
        backend.lens(PROMPT, top_k="5")


def test_the_pipeline_reads_only_the_positions_asked_for(smollm2_tokenizer):
    """A reader is asked for the lens's positions, so a server cuts each row to them before upcasting and
    stacking (``positions=[-1]`` on a long prompt holds one column per row, not the whole prompt in float32);
    the nnsight reader inside a trace returns exactly those columns of what it would read in full."""
    from lens_plugins.core import pipeline
    from lens_plugins.core.readout import DecoderTensors

    asked = []

    def read(rows, positions=None):
        asked.append(positions)
        return torch.ones(len(rows), 2, 10, 8)[:, :, positions]

    rows = row_plan.plan(3)
    decoder = DecoderTensors("none", torch.zeros(8, 16))
    flat = pipeline.lens_rows(read, rows, [4, 6], None, decoder)
    assert asked == [[4, 6]] and flat.shape == (len(rows), 2 * 2, 8)
    # Contiguous positions (every position, or the last) are a slice: each row is cut as a view, not copied.
    flat = pipeline.lens_rows(read, rows, [3, 4, 5], None, decoder)
    assert asked[-1] == slice(3, 6) and flat.shape == (len(rows), 2 * 3, 8)
    model = lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)
    spec = architectures.resolve(model)
    with model.trace(TOKENS):
        full = trace_reader.reader(model, spec)(rows).save()
    with model.trace(TOKENS):
        cut = trace_reader.reader(model, spec)(rows, [1, 5]).save()
    assert torch.equal(cut, full[:, :, [1, 5]])
    with model.trace(TOKENS):
        span = trace_reader.reader(model, spec)(rows, slice(2, 5)).save()
    assert torch.equal(span, full[:, :, 2:5])


def test_padding_side_is_an_option_of_both_one_call_forms(backend):
    """nnsight's one-call forms took the tokenizer's side only (tests used to flip it by hand); both now take
    ``padding_side``, refuse anything but left / right the same way, and leave the tokenizer as it was."""
    side = backend.model.tokenizer.padding_side
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        backend.lens([PROMPT, "in"], padding_side="middle")
    left = backend.lens([PROMPT, "in"], padding_side="left")
    right = backend.lens([PROMPT, "in"], padding_side="right")
    assert backend.model.tokenizer.padding_side == side
    assert left.attention_mask[1, 0] == 0 and right.attention_mask[1, -1] == 0  # where the short prompt is padded
    n = int(left.attention_mask[1].sum())
    torch.testing.assert_close(left.entropy[:, 1, -n:], right.entropy[:, 1, :n], atol=TOL, rtol=0)


def test_a_single_reduction_name_is_one_reduction_on_both_backends(smollm2_hf, smollm2_bridge):
    """``reductions="entropy"`` used to reach the nnsight trace as ('e', 'n', 't', ...) and be refused letter by
    letter; a single name is one reduction on every entry point."""
    from lens_plugins.backends.nnsight import wrap_model

    hf, tokenizer = smollm2_hf
    for result in (lp.nnsight.run_logit_lens(wrap_model(hf, tokenizer), "Hello there", reductions="entropy"),
                   lp.transformer_lens.run_logit_lens(smollm2_bridge, "Hello there", reductions="entropy")):
        assert result.entropy is not None and torch.isfinite(result.entropy).all()
        assert result.top_ids is None  # only what was asked for
