"""Causal checks of a lens: the basis is orthonormal and beats random directions on the lens; the ablation
runs at the named row (against a forward pre-hook on the Hugging Face model) and measures the model's final
distribution (at the last row, through the logit lens, the lens's effect *is* the model's); both backends
agree; bad input is refused."""

import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends import transformer_lens as tla
from lens_plugins.backends.hf import decoder_tensors, residual_stack
from lens_plugins.core import causal_basis as arithmetic
from lens_plugins.lenses.affine import LogitLens
from lens_plugins.methods import causal_checks as cc
from tiny_models import random_tokens, tiny_model

BLOCKS = random_tokens(6, 17, seed=4)
PROMPTS = ["in the of to and is at", "a b c d e f the in"]  # SmolLM2 ids below the tiny vocabulary


def sharp():
    """The tiny Llama with its unembedding scaled up: a random model's next-token distributions are nearly
    flat, so every KL would be ~1e-6 and float32 noise; sharpened, they are ~1e-2 and comparable."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def models(smollm2_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=sharp(),
                                                 tokenizer=smollm2_tokenizer).eval()
    return {"transformer_lens": bridge, "nnsight": lpn.wrap_model(sharp(), smollm2_tokenizer)}


@pytest.fixture(scope="module")
def basis(models):
    return cc.causal_basis(models["nnsight"], LogitLens(), "2_pre", BLOCKS, k=3, steps=40)


def test_the_basis_is_orthonormal_and_beats_random_directions(models, basis):
    assert basis.basis.shape == (3, 64) and basis.tokens == 6 * 16
    torch.testing.assert_close(basis.basis @ basis.basis.T, torch.eye(3), atol=1e-5, rtol=0)
    # each direction's gain is its own ablation's mean KL on the lens, and the first is the largest found
    hidden = torch.cat([residual_stack(sharp(), b[None])[2, 0, 1:] for b in BLOCKS])
    logprobs = cc.lens_logprobs(LogitLens(), decoder_tensors(sharp()), "2_pre")
    with torch.no_grad():
        clean = logprobs(hidden)
        own = [float(arithmetic.kl(clean, logprobs(arithmetic.ablate(hidden, v[None], hidden.mean(0)))).mean())
               for v in basis.basis]
        control = arithmetic.random_basis(3, 64, torch.Generator().manual_seed(9))
        random = [float(arithmetic.kl(clean, logprobs(arithmetic.ablate(hidden, v[None], hidden.mean(0)))).mean())
                  for v in control]
    torch.testing.assert_close(torch.tensor(own), basis.gains, atol=1e-5, rtol=1e-4)
    assert min(own) > max(random)
    torch.testing.assert_close(control @ control.T, torch.eye(3), atol=1e-5, rtol=0)


def test_ablate_is_mean_ablation_of_the_span():
    generator = torch.Generator().manual_seed(0)
    basis = arithmetic.random_basis(2, 8, generator)
    h, mean = torch.randn(5, 8, generator=generator), torch.randn(8, generator=generator)
    out = arithmetic.ablate(h, basis, mean)
    torch.testing.assert_close(out @ basis.T, (mean @ basis.T).expand(5, 2), atol=1e-6, rtol=0)  # set to the mean's
    rest = torch.eye(8) - basis.T @ basis
    torch.testing.assert_close(out @ rest, h @ rest, atol=1e-6, rtol=0)  # the complement untouched


def _manual(hf, tokens, layer, basis, mean):
    """The ablation by hand: a forward pre-hook on decoder layer ``layer`` of the HF model."""
    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = h.clone()
        h[:, 1:] = arithmetic.ablate(h[:, 1:], basis, mean)
        return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    clean = hf(tokens).logits.float().log_softmax(-1)
    handle = hf.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ablated = hf(tokens).logits.float().log_softmax(-1)
    finally:
        handle.remove()
    return arithmetic.kl(clean[0], ablated[0])


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_the_ablation_is_at_the_named_row_and_on_the_final_distribution(models, basis, backend):
    tokens = torch.tensor([[254, 260, 282, 288, 284, 314, 418]])
    run = (tla if backend == "transformer_lens" else lpn).run_ablation
    out = run(models[backend], tokens, "2_pre", basis.basis, basis.mean)
    with torch.no_grad():
        expected = _manual(sharp(), tokens, 2, basis.basis, basis.mean)
        wrong_row = _manual(sharp(), tokens, 1, basis.basis, basis.mean)
    assert expected[1:].min() > 1e-4  # large enough for float32 to tell rows apart
    torch.testing.assert_close(out["effect"], expected, atol=1e-6, rtol=1e-4)
    assert out["effect"][0] == 0 and (out["effect"][1:] > 0).all()  # position 0 is never ablated
    assert not torch.allclose(expected, wrong_row, rtol=0.1, atol=0)
    torch.testing.assert_close(out["hidden"], residual_stack(sharp(), tokens)[2, 0], atol=1e-5, rtol=0)


def test_at_the_last_row_the_logit_lens_effect_is_the_model_effect(models):
    """The logit lens of the last row is the model's output, so ablating there moves both alike, per position,
    on both backends: an effect measured on the wrong distribution, or at another row, breaks the equality."""
    last = cc.causal_basis(models["nnsight"], LogitLens(), "2_post", BLOCKS, k=2, steps=10)
    results = {b: cc.subspace_ablation(models[b], {"logit lens": (LogitLens(), last)}, PROMPTS) for b in models}
    for result in results.values():
        assert result.model_effect.shape == (1, 2, 6 + 7)
        torch.testing.assert_close(result.lens_effect, result.model_effect, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results["transformer_lens"].model_effect, results["nnsight"].model_effect,
                               atol=1e-5, rtol=1e-4)


def test_backends_agree_and_the_views(models, basis):
    results = {b: cc.subspace_ablation(models[b], {"logit lens": (LogitLens(), basis)}, PROMPTS) for b in models}
    tl, nn = results["transformer_lens"], results["nnsight"]
    torch.testing.assert_close(tl.model_effect, nn.model_effect, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tl.lens_effect, nn.lens_effect, atol=1e-6, rtol=1e-5)
    frame = tl.summary()
    assert list(frame["ablated"]) == ["causal basis", "random"] and frame["lens_kl"][0] > frame["lens_kl"][1]
    assert tl.model_ratio().shape == (1,)
    assert len(tl.plot().data) == 2


def test_bad_input(models, basis):
    with pytest.raises(lp.LensError, match="not a residual row"):
        cc.causal_basis(models["nnsight"], LogitLens(), "2_mid", BLOCKS, k=2)
    with pytest.raises(lp.LensError, match="k must be between"):
        cc.causal_basis(models["nnsight"], LogitLens(), "1_pre", BLOCKS, k=0)
    other = cc.causal_basis(models["nnsight"], LogitLens(), "1_pre", BLOCKS, k=3, steps=1)
    with pytest.raises(lp.LensError, match="one row and one k"):
        cc.subspace_ablation(models["nnsight"], {"a": (LogitLens(), basis), "b": (LogitLens(), other)}, PROMPTS)
    with pytest.raises(lp.LensError, match="at least two tokens"):
        cc.subspace_ablation(models["nnsight"], {"a": (LogitLens(), basis)}, ["in"])
