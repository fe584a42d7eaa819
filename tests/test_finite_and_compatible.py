"""Issue 25, defects 6 and 7: a lens made for another model is refused, and nothing non-finite is decoded.

Every refusal is asserted on both backends where the path exists on both (TransformerLens through a
TransformerBridge, nnsight through ``wrap_model``), with the same message: the checks live where both
backends meet (``core.lenses.resolve``, ``core.pipeline``, ``core.dla``, ``methods.patchscope``).
"""

import json
import re

import pytest
import torch

import lens_plugins as lp
from lens_plugins.errors import LensError, LensFloatingPointError, LensValueError
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends.hf import decoder_tensors
from lens_plugins.core import lenses as core_lenses
from lens_plugins.core import pipeline
from lens_plugins.core.readout import DecoderTensors
from lens_plugins.core.rows import plan
from lens_plugins.lenses.future import FutureLens
from lens_plugins.lenses.tuned import TunedLens
from lens_plugins.methods.evaluate import evaluate_lenses
from tiny_models import random_tokens, tiny_model

TOKENS = random_tokens(batch=1, seq=6)
PROMPT = " of the and in the"  # ids below the tiny models' 1000


def bridge_of(hf, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tokenizer).eval()


def tl_lens(hf, tokenizer, **kwargs):
    bridge = bridge_of(hf, tokenizer)
    _, cache = bridge.run_with_cache(TOKENS, names_filter=lp.transformer_lens.hook_filter(bridge))
    return lp.transformer_lens.logit_lens(cache, tokens=TOKENS, top_k=3, **kwargs)


def nnsight_lens(hf, tokenizer, **kwargs):
    model = lpn.wrap_model(hf, tokenizer)
    with model.trace(TOKENS):
        saved = lpn.logit_lens(model, top_k=3, **kwargs)
    return lpn.logit_lens_result(saved, model)


def refusal(call, error=LensError):
    """The message of the error ``call()`` raises (it must raise ``error``, a ``LensError``)."""
    with pytest.raises(error) as caught:
        call()
    assert isinstance(caught.value, LensError)
    return str(caught.value)


def same_refusal_on_both_backends(hf_factory, tokenizer, error=LensError, **kwargs):
    on_tl = refusal(lambda: tl_lens(hf_factory(), tokenizer, **kwargs), error)
    on_nnsight = refusal(lambda: nnsight_lens(hf_factory(), tokenizer, **kwargs), error)
    assert on_tl == on_nnsight
    return on_tl


# --- defect 6: a lens for another model ------------------------------------------------------------------------


@pytest.mark.parametrize("shape,differs", [
    ((64, 5), r"tiny: 5 layers\), but this model has 3 layers"),   # deeper: used to pass and remap the final row
    ((64, 2), r"tiny: 2 layers\), but this model has 3 layers"),   # shallower
    ((32, 3), r"tiny: d_model=32\), but this model has d_model=64"),
])
def test_a_lens_of_another_depth_or_width_is_refused_with_one_message_everywhere(smollm2_tokenizer, shape, differs):
    lens = TunedLens(*shape, base_model_name_or_path="tiny")
    message = same_refusal_on_both_backends(lambda: tiny_model("llama"), smollm2_tokenizer, LensValueError,
                                            lens=lens)
    assert message.startswith("lens= was made for another model")
    assert re.search(differs, message) and "Load the lens trained for this model" in message
    model = lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)
    # The remote path: the lens turns into tensors on the caller's machine, refused there with the same words.
    assert refusal(lambda: lpn.lens_tensors(model, lens)) == message
    assert refusal(lambda: lpn.run_logit_lens(model, PROMPT, lens=lens, remote="local")) == message
    bridge = bridge_of(tiny_model("llama"), smollm2_tokenizer)
    assert refusal(lambda: lp.transformer_lens.run_logit_lens(bridge, PROMPT, lens=lens)) == message
    # The logit difference, the generation lens and evaluation resolve the lens the same way.
    assert refusal(lambda: lp.transformer_lens.run_logit_diff(bridge, PROMPT, " the", " a", lens=lens)) == message
    assert refusal(lambda: lpn.run_logit_diff(model, PROMPT, " the", " a", lens=lens)) == message
    assert refusal(lambda: lp.transformer_lens.run_generation_lens(bridge, PROMPT, max_new_tokens=2, lens=lens)) == message
    assert refusal(lambda: lpn.run_generation_lens(model, PROMPT, max_new_tokens=2, lens=lens)) == message
    assert refusal(lambda: evaluate_lenses(tiny_model("llama"), TOKENS, [lens])) == message


def test_a_lens_recording_another_unembedding_is_refused_and_its_own_model_is_not(tmp_path, smollm2_tokenizer):
    """Same shapes, other weights (another seed): only the fingerprint TunedLens.for_model records tells them
    apart, and it survives save and load."""
    other = TunedLens.for_model(tiny_model("llama", seed=1))
    assert other.config["model_fingerprint"]["d_vocab"] == 1000
    message = same_refusal_on_both_backends(lambda: tiny_model("llama"), smollm2_tokenizer, LensValueError,
                                            lens=other)
    assert "its unembedding), but this model has another unembedding (same shapes, other weights)" in message
    other.save(tmp_path / "other")
    reloaded = TunedLens.load(tmp_path / "other")
    assert reloaded.made_for == other.made_for
    assert refusal(lambda: TunedLens.load(tmp_path / "other", tiny_model("llama"))) == message
    assert refusal(lambda: evaluate_lenses(tiny_model("llama"), TOKENS, [reloaded])) == message
    # Its own model takes it, and a zero lens is still exactly the logit lens.
    own = TunedLens.for_model(tiny_model("llama"))
    plain, tuned = tl_lens(tiny_model("llama"), smollm2_tokenizer), tl_lens(tiny_model("llama"), smollm2_tokenizer, lens=own)
    assert torch.equal(plain.top_logprobs, tuned.top_logprobs) and torch.equal(plain.kl_final_row, tuned.kl_final_row)
    traced = nnsight_lens(tiny_model("llama"), smollm2_tokenizer, lens=own)
    assert torch.equal(traced.top_ids, plain.top_ids)


def test_a_checkpoint_without_a_fingerprint_is_checked_on_shape_alone(tmp_path, smollm2_tokenizer):
    """Lenses saved before the fingerprint (and tuned-lens's own) still load and decode."""
    hf = tiny_model("llama", seed=1)
    lens = TunedLens(64, 3)
    lens.save(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    assert "model_fingerprint" not in config
    result = tl_lens(tiny_model("llama"), smollm2_tokenizer, lens=TunedLens.load(tmp_path / "old", hf))
    assert torch.isfinite(result.kl_final_row).all()


def test_the_fingerprint_survives_dtype_and_transformer_lens_weight_processing():
    """What the probe compares ignores a per-dimension shift and scale (TransformerLens's center_unembed and
    fold_ln) and half-precision rounding, and tells two random models apart."""
    W_U = decoder_tensors(tiny_model("llama")).W_U
    recorded = core_lenses.fingerprint(DecoderTensors("none", W_U))["unembed_probe"]
    assert core_lenses.same_unembedding(recorded, W_U.bfloat16())
    scale = torch.rand(W_U.shape[0], 1) + 0.5
    assert core_lenses.same_unembedding(recorded, (W_U - W_U.mean(-1, keepdim=True)) * scale)
    assert not core_lenses.same_unembedding(recorded, decoder_tensors(tiny_model("llama", seed=1)).W_U)


def test_a_shipped_lens_carries_what_it_was_made_for_to_the_server():
    """``resolve`` on the server checks the ``made_for`` that travelled with the tensors."""
    rows = plan(3)
    deep = TunedLens(64, 5, base_model_name_or_path="tiny")
    shipped = core_lenses.shipped(torch.zeros(len(rows), 64, 64), None, [r.label for r in rows], deep.made_for)
    decoder = DecoderTensors("none", torch.randn(64, 10))
    with pytest.raises(LensValueError, match=r"tiny: 5 layers\), but this model has 3 layers"):
        core_lenses.resolve(shipped, rows, decoder)
    assert core_lenses.resolve({**shipped, "made_for": None}, rows, decoder)[0] is shipped["weight"]


def test_a_future_lens_of_another_width_is_refused_on_every_entry_point(smollm2_tokenizer):
    lens = FutureLens(32, ["embed", "1_pre", "2_post"], 2)
    message = same_refusal_on_both_backends(lambda: tiny_model("llama"), smollm2_tokenizer, LensValueError,
                                            lens=lens)
    assert "(unnamed: d_model=32), but this model has d_model=64" in message
    from lens_plugins.lenses import future

    assert refusal(lambda: future.lens_result(lens, tiny_model("llama"), TOKENS, smollm2_tokenizer)) == message
    assert refusal(lambda: future.evaluate(lens, tiny_model("llama"), TOKENS)) == message


# --- defect 7: nothing non-finite is decoded -------------------------------------------------------------------


def test_tuned_lens_load_refuses_non_finite_weights_naming_file_and_tensor(tmp_path):
    lens = TunedLens(8, 2)
    lens.save(tmp_path / "lens")
    state = torch.load(tmp_path / "lens" / "params.pt")
    state["1.bias"][3] = float("nan")
    torch.save(state, tmp_path / "lens" / "params.pt")
    message = refusal(lambda: TunedLens.load(tmp_path / "lens"), LensValueError)
    assert str(tmp_path / "lens" / "params.pt") in message and "tensor '1.bias' holds NaN (1 of 8" in message


def test_future_lens_load_refuses_non_finite_weights_naming_file_and_tensor(tmp_path):
    lens = FutureLens(8, ["embed"], 1)
    with torch.no_grad():
        lens.weight[0, 0, 0] = float("inf")
    lens.save(tmp_path / "future.pt")
    message = refusal(lambda: FutureLens.load(tmp_path / "future.pt"), LensValueError)
    assert str(tmp_path / "future.pt") in message and "tensor 'weight' holds inf" in message


def damaged(parameter, value=float("nan")):
    def build():
        hf = tiny_model("llama")
        with torch.no_grad():
            dict(hf.named_parameters())[parameter].view(-1)[5] = value
        return hf
    return build


@pytest.mark.parametrize("parameter,name", [("lm_head.weight", "W_U"), ("model.norm.weight", "norm_weight")])
def test_a_non_finite_decoder_is_refused_naming_the_tensor_on_both_backends(smollm2_tokenizer, parameter, name):
    message = same_refusal_on_both_backends(damaged(parameter), smollm2_tokenizer, LensValueError)
    assert message.startswith(f"the decoder's {name} (") and "holds NaN (1 of" in message and "reload them" in message
    # Attribution reads the same decoder, on both backends.
    bridge = bridge_of(damaged(parameter)(), smollm2_tokenizer)
    model = lpn.wrap_model(damaged(parameter)(), smollm2_tokenizer)
    assert refusal(lambda: lp.transformer_lens.run_attribution(bridge, PROMPT, " the")) == message
    assert refusal(lambda: lpn.run_attribution(model, PROMPT, " the")) == message


def test_a_decoder_bias_holding_inf_is_named():
    decoder = DecoderTensors("none", torch.zeros(4, 10), b_U=torch.tensor([0.0] * 9 + [float("inf")]))
    with pytest.raises(LensValueError, match=r"the decoder's b_U \(the unembedding's bias\) holds inf \(1 of 10"):
        pipeline.check_decoder(decoder)


class Overflowing:
    """A custom lens whose transform overflows on one row."""

    def transform(self, resid, rows):
        out = resid.clone()
        out[1] = out[1] * float("inf")
        return out


def test_a_lens_output_holding_nan_or_inf_is_refused_naming_the_row(smollm2_tokenizer):
    message = same_refusal_on_both_backends(lambda: tiny_model("llama"), smollm2_tokenizer,
                                            LensFloatingPointError, lens=Overflowing())
    assert message.startswith("the lens (lens=) turned finite residuals into inf at row '1_pre'")
    # A tuned lens whose weights went NaN in memory: the same check after the affine map, local and shipped.
    lens = TunedLens.for_model(tiny_model("llama"))
    with torch.no_grad():
        lens.layer_translators[2].bias[0] = float("nan")
    message = same_refusal_on_both_backends(lambda: tiny_model("llama"), smollm2_tokenizer,
                                            LensFloatingPointError, lens=lens)
    assert "into NaN at row '2_pre'" in message
    model = lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)
    assert refusal(lambda: nnsight_lens(tiny_model("llama"), smollm2_tokenizer,
                                        lens=lpn.lens_tensors(model, lens))) == message
    assert refusal(lambda: evaluate_lenses(tiny_model("llama"), TOKENS, [lens])) == message


def test_a_patchscope_mapping_that_yields_nan_is_refused_naming_mapping_and_row(smollm2_tokenizer):
    def blow_up(hidden):
        return hidden * float("nan")

    bridge = bridge_of(tiny_model("llama"), smollm2_tokenizer)
    model = lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)
    kwargs = dict(layers=["1_pre"], positions=[2], mapping=blow_up)
    on_tl = refusal(lambda: lp.transformer_lens.run_patchscope(bridge, TOKENS, **kwargs), LensFloatingPointError)
    on_nnsight = refusal(lambda: lpn.run_patchscope(model, TOKENS, **kwargs), LensFloatingPointError)
    assert on_tl == on_nnsight
    assert on_tl.startswith("mapping=blow_up turned the finite hidden state of row '1_pre' at source position 2 into NaN")
    # An affine mapping with an inf weight is named as one.
    weight = torch.eye(64)
    weight[0, 0] = float("inf")
    message = refusal(lambda: lpn.run_patchscope(model, TOKENS, layers=["1_pre"], positions=[2],
                                                 mapping=(weight, None)))
    assert message.startswith("mapping=the affine (weight, bias) pair turned")


def test_attribution_refuses_non_finite_residual_parts_naming_the_first_component(smollm2_tokenizer):
    """An MLP that writes NaN at layer 1: every later part reads it, and the message names where it began."""
    build = damaged("model.layers.1.mlp.down_proj.weight")
    bridge = bridge_of(build(), smollm2_tokenizer)
    model = lpn.wrap_model(build(), smollm2_tokenizer)
    on_tl = refusal(lambda: lp.transformer_lens.run_attribution(bridge, PROMPT, 7), LensValueError)
    on_nnsight = refusal(lambda: lpn.run_attribution(model, PROMPT, 7), LensValueError)
    assert on_tl == on_nnsight
    assert on_tl.startswith("the residual stream holds NaN from component '1_mlp' on (part 'mlp', batch item 0)")
