"""Sublayer substitution (Din et al. 2024): the fit is the least-squares solution of pairs read by another
reader (a TransformerLens cache); a sublayer whose contribution is exactly linear (zero) is retained 100%
with no KL; the verb equals hand-written Hugging Face hooks doing the same; both backends agree; position 0 is
never substituted; bad input is refused."""

import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends import transformer_lens as tlb
from lens_plugins.core import substitution as arithmetic
from lens_plugins.core.cross_model import r_squared
from lens_plugins.methods import substitution as sub
from tiny_models import random_tokens, tiny_model

BLOCKS = random_tokens(6, 17, seed=4)
PROMPTS = ["in the of to and is at", "a b c d e f the in"]  # SmolLM2 ids below the tiny vocabulary


def sharp(zero=False):
    """The tiny Llama with its unembedding scaled up (so top-1s and KLs are far above float32 noise) and its
    MLP and attention-score weights too (so that no sublayer is nearly linear); with
    ``zero``, block 1's MLP and block 2's attention write nothing (their contribution is the linear map 0)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
        for layer in model.model.layers:  # a random MLP at init is nearly linear (R^2 0.999): make it less so
            layer.mlp.gate_proj.weight.mul_(10.0)
            layer.mlp.down_proj.weight.mul_(10.0)
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
        if zero:
            model.model.layers[1].mlp.down_proj.weight.zero_()
            model.model.layers[2].self_attn.o_proj.weight.zero_()
    return model


def bridge(hf, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tokenizer).eval()


@pytest.fixture(scope="module")
def models(smollm2_tokenizer):
    return {"transformer_lens": bridge(sharp(), smollm2_tokenizer), "nnsight": lpn.wrap_model(sharp(), smollm2_tokenizer)}


@pytest.fixture(scope="module")
def shortcuts(models):
    return sub.fit_sublayer_shortcuts(models["nnsight"], BLOCKS, ridge=0.0)


def test_the_fit_is_least_squares_of_pairs_read_from_a_transformer_lens_cache(models, shortcuts):
    model = models["transformer_lens"]
    assert shortcuts.layers == [0, 1, 2] and shortcuts.tokens == 6 * 16
    names = {("attn", "x"): "hook_resid_pre", ("attn", "y"): "hook_attn_out",
             ("mlp", "x"): "hook_resid_mid", ("mlp", "y"): "hook_mlp_out"}
    with torch.no_grad():
        _, cache = model.run_with_cache(BLOCKS)
    for layer in (0, 2):
        for sublayer in ("attn", "mlp"):
            x = cache[f"blocks.{layer}.{names[sublayer, 'x']}"][:, 1:].reshape(-1, 64).double()
            y = cache[f"blocks.{layer}.{names[sublayer, 'y']}"][:, 1:].reshape(-1, 64).double()
            xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], -1)
            solution = torch.linalg.lstsq(xa, y, driver="gelsd").solution
            weight, bias = shortcuts.map(layer, sublayer)
            torch.testing.assert_close(weight.double(), solution[:64].T, atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(bias.double(), solution[64], atol=2e-3, rtol=2e-3)
            r2 = shortcuts.r2[layer, ("attn", "mlp").index(sublayer)]
            assert abs(float(r2) - r_squared(x, y, weight, bias)) < 1e-4
            assert 0.0 < float(r2) < 1.0  # a random model's sublayers are not linear


@pytest.mark.parametrize("kind", ["transformer_lens", "nnsight"])
def test_a_sublayer_that_is_exactly_linear_is_retained_in_full(kind, smollm2_tokenizer):
    hf = sharp(zero=True)
    model = bridge(hf, smollm2_tokenizer) if kind == "transformer_lens" else lpn.wrap_model(hf, smollm2_tokenizer)
    shortcuts = sub.fit_sublayer_shortcuts(sharp(zero=True), BLOCKS, ridge=1e-4)
    # the fit recovers the map: no weight, the module's bias (the contribution is that constant)
    for (layer, sublayer), module in (((1, "mlp"), hf.model.layers[1].mlp.down_proj),
                                      ((2, "attn"), hf.model.layers[2].self_attn.o_proj)):
        weight, bias = shortcuts.map(layer, sublayer)
        assert float(weight.abs().max()) < 1e-4
        torch.testing.assert_close(bias, module.bias.detach(), atol=1e-5, rtol=1e-5)
    result = sub.sublayer_substitution(model, shortcuts, PROMPTS)
    retained = result.retained()
    assert float(retained[1, 1]) == 1.0 and float(retained[2, 0]) == 1.0
    assert float(result.kl[1, 1].abs().max()) < 1e-5 and float(result.kl[2, 0].abs().max()) < 1e-5
    # the substitutions of sublayers that are not linear do change the output
    assert float(result.kl[0, 0].mean()) > 1e-4 and float(result.kl[0, 1].mean()) > 1e-4


def _by_hand(tokens, layer, sublayer, weight, bias):
    """The substitution with Hugging Face hooks on a fresh copy: keep the sublayer's input residual (the
    decoder layer's input, or the post-attention norm's input for the MLP) and overwrite the sublayer module's
    output at positions 1 onwards."""
    hf = sharp()
    block = hf.model.layers[layer]
    kept = {}

    def keep(module, args, kwargs):
        kept["x"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def overwrite(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out = out.clone()
        out[:, 1:] = kept["x"][:, 1:] @ weight.T + bias
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

    reader = block if sublayer == "attn" else block.post_attention_layernorm
    writer = block.self_attn if sublayer == "attn" else block.mlp
    handles = [reader.register_forward_pre_hook(keep, with_kwargs=True), writer.register_forward_hook(overwrite)]
    try:
        with torch.no_grad():
            logits = hf(tokens).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits


@pytest.mark.parametrize("kind", ["transformer_lens", "nnsight"])
def test_the_verb_equals_hand_written_hooks(kind, models, shortcuts):
    tokens = random_tokens(1, 9, seed=11)
    plan = [(1, "attn"), (2, "mlp"), (0, "mlp")]
    weight = torch.stack([shortcuts.map(*p)[0] for p in plan])
    bias = torch.stack([shortcuts.map(*p)[1] for p in plan])
    run = (tlb if kind == "transformer_lens" else lpn).run_substitution
    out = run(models[kind], tokens, plan, weight, bias)
    with torch.no_grad():
        clean = sharp()(tokens).logits[0].log_softmax(-1)
    torch.testing.assert_close(out["top1"][0], clean.argmax(-1))
    assert float(out["kl"][:, 0].abs().max()) < 1e-5  # position 0 is never substituted
    for i, (layer, sublayer) in enumerate(plan):
        logits = _by_hand(tokens, layer, sublayer, weight[i], bias[i]).log_softmax(-1)
        torch.testing.assert_close(out["top1"][i + 1], logits.argmax(-1))
        expected = (clean.exp() * (clean - logits)).sum(-1)
        torch.testing.assert_close(out["kl"][i], expected, atol=1e-6, rtol=1e-3)
        assert float(expected[1:].mean()) > 2e-5  # the substitution did something (float32 noise: ~1e-7)
    # another block's substitution is not this one's
    other = _by_hand(tokens, 0, "attn", weight[0], bias[0]).log_softmax(-1)
    assert not torch.allclose((clean.exp() * (clean - other)).sum(-1), out["kl"][0], atol=1e-6, rtol=1e-3)


def test_both_backends_agree(models, shortcuts):
    results = {kind: sub.sublayer_substitution(model, shortcuts, PROMPTS, chunk=3) for kind, model in models.items()}
    a, b = results["transformer_lens"], results["nnsight"]
    assert a.kept.shape == (3, 2, 6 + 7) and a.layers == [0, 1, 2] and a.sublayers == ["attn", "mlp"]
    assert torch.equal(a.kept, b.kept)
    torch.testing.assert_close(a.kl, b.kl, atol=1e-6, rtol=1e-3)
    # chunking does not change the numbers
    whole = sub.sublayer_substitution(models["nnsight"], shortcuts, PROMPTS, chunk=8)
    assert torch.equal(whole.kept, b.kept)
    torch.testing.assert_close(whole.kl, b.kl, atol=1e-6, rtol=1e-4)
    frame = b.to_dataframe()
    assert len(frame) == 6 and set(frame["sublayer"]) == {"attn", "mlp"}
    assert b.plot().data  # the figure draws


def test_the_public_names(models, shortcuts):
    assert lp.fit_sublayer_shortcuts is sub.fit_sublayer_shortcuts
    assert lp.sublayer_substitution is sub.sublayer_substitution
    assert lp.transformer_lens.run_substitution is tlb.run_substitution
    assert lp.nnsight.run_substitution is lpn.run_substitution


def test_bad_input_is_refused(models, shortcuts):
    model = models["nnsight"]
    with pytest.raises(lp.LensError, match="no shortcut for block 7"):
        sub.sublayer_substitution(model, shortcuts, PROMPTS, layers=[7])
    with pytest.raises(lp.LensError, match="sublayers must be"):
        sub.sublayer_substitution(model, shortcuts, PROMPTS, sublayers=["ffn"])
    with pytest.raises(lp.LensError, match="chunk"):
        sub.sublayer_substitution(model, shortcuts, PROMPTS, chunk=0)
    with pytest.raises(lp.LensError, match="non-empty list"):
        sub.sublayer_substitution(model, shortcuts, "a prompt")
    with pytest.raises(lp.LensError, match="layers must be"):
        sub.fit_sublayer_shortcuts(model, BLOCKS, layers=[9])
    with pytest.raises(lp.LensError, match="do not determine"):
        sub.fit_sublayer_shortcuts(model, BLOCKS[:1], layers=[0], ridge=0.0)
    with pytest.raises(lp.LensError, match="ridge"):
        arithmetic.solve(torch.eye(3, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64), -1.0)
