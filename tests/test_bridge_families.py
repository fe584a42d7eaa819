"""TransformerLens bridges of families whose forward does more after the last block than final norm and W_U
(found by ``tools/architectures_coverage.py``'s bridge check): a logit multiplier is folded into the decoder
(Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``), and BERT's prediction head (dense, activation,
then the norm) is refused rather than skipped. The reference is the Hugging Face model's own forward, taken
before the bridge boots around it."""

import sys
from pathlib import Path

import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends.transformer_lens.reader import output_scale
from lens_plugins.backends.transformer_lens.verification import decoder_for
from lens_plugins.core.errors import LensError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import architectures_coverage as coverage  # noqa: E402

TOKENS = torch.tensor([[5, 17, 42, 300, 7, 99]])


def bridge_and_reference(model_type, class_name, **config):
    """A tiny random model (the coverage script's), its own log-probs on ``TOKENS``, then the bridge around it."""
    from transformer_lens.model_bridge import TransformerBridge

    model = coverage.tiny(model_type, class_name, **config)
    with torch.no_grad():
        reference = model(TOKENS).logits.float().log_softmax(-1)
    model.config.architectures = [class_name]
    bridge = TransformerBridge.boot_transformers(f"tiny-{model_type}", hf_model=model,
                                                 tokenizer=coverage.tiny_tokenizer(512)).eval()
    return bridge, reference


@pytest.mark.parametrize("model_type, class_name, config, scale", [
    ("cohere", "CohereForCausalLM", {"logit_scale": 0.0625}, 0.0625),
    ("cohere2", "Cohere2ForCausalLM", {"logit_scale": 0.25}, 0.25),
    ("granite", "GraniteForCausalLM", {"logits_scaling": 8.0}, 1 / 8.0),
])
def test_a_logit_multiplier_is_folded_into_the_bridge_decoder(model_type, class_name, config, scale):
    bridge, reference = bridge_and_reference(model_type, class_name, **config)
    assert output_scale(bridge) == pytest.approx(scale, rel=1e-6)
    _, cache = bridge.run_with_cache(TOKENS, names_filter=lp.transformer_lens.hook_filter(bridge))
    decoder = decoder_for(bridge)
    last = cache[f"blocks.{bridge.cfg.n_layers - 1}.hook_resid_post"]
    ours = decoder.unembed(decoder.normalize(last)).log_softmax(-1)
    assert (ours - reference).abs().max() <= 1e-4
    # without the multiplier the same row decodes to other log-probs: the check above can fail
    plain = (decoder.unembed(decoder.normalize(last)) / scale).log_softmax(-1)
    assert (plain - reference).abs().max() > 1e-2
    result = cache.lens.logit_lens(tokens=TOKENS, top_k=3)
    assert (result.top_logprobs[-1] - reference.topk(3, dim=-1).values).abs().max() <= 1e-4


def test_a_bridge_that_decodes_through_a_prediction_head_is_refused():
    bridge, _ = bridge_and_reference("bert", "BertLMHeadModel")
    with pytest.raises(LensError, match="decodes through a prediction head"):
        decoder_for(bridge)  # every TransformerLens verb decodes through it


def test_the_bridge_check_names_what_it_verified_and_what_it_refused():
    """The coverage page's TransformerLens column on three families: one verified, BERT refused by the
    backend (the reason is the error's), a family without an adapter."""
    tl_classes = coverage.transformer_lens_families()
    rows = {t: coverage.check(t, dict(coverage.families())[t], tl_classes) for t in ("llama", "bert", "biogpt")}
    assert rows["llama"]["tl"] == "verified"
    assert rows["bert"]["tl"].startswith("refused: this bridge's model decodes through a prediction head")
    assert rows["biogpt"]["tl"] == "no adapter"


def test_a_final_norm_convention_the_class_name_hides_is_fitted_at_first_use():
    """VaultGemma's final norm multiplies by ``1 + w`` under a class name (``VaultGemmaRMSNorm``) that does not
    say so: read as ``w`` the lens's last row decodes to other log-probs. The first-use verification fits the
    convention from the norm's recorded input and output, and the lens then reproduces the model."""
    from lens_plugins.backends.transformer_lens.reader import build_decoder

    bridge, reference = bridge_and_reference("vaultgemma", "VaultGemmaForCausalLM")
    _, cache = bridge.run_with_cache(TOKENS, names_filter=lp.transformer_lens.hook_filter(bridge))
    last = cache[f"blocks.{bridge.cfg.n_layers - 1}.hook_resid_post"]
    unfitted = build_decoder(bridge)
    assert (unfitted.unembed(unfitted.normalize(last)).log_softmax(-1) - reference).abs().max() > 1e-2
    result = cache.lens.logit_lens(tokens=TOKENS, top_k=3)
    assert (result.top_logprobs[-1] - reference.topk(3, dim=-1).values).abs().max() <= 1e-4


def test_a_bridge_whose_decoder_is_not_the_models_is_refused_before_any_lens_runs():
    """ModernBERT's decoder applies a prediction head the bridge's ``ln_final`` / ``W_U`` leave out: every
    lens on it would be silently wrong, so the first use refuses it, naming the row and the mismatch."""
    from lens_plugins.core.errors import UnknownArchitectureError

    bridge, _ = bridge_and_reference("modernbert-decoder", "ModernBertDecoderForCausalLM")
    _, cache = bridge.run_with_cache(TOKENS, names_filter=lp.transformer_lens.hook_filter(bridge))
    with pytest.raises(UnknownArchitectureError, match=r"row '1_post' decoded differs from the model's own logits by "):
        cache.lens.logit_lens(tokens=TOKENS)
    with pytest.raises(UnknownArchitectureError, match="ModernBertDecoderForCausalLM cannot be lensed"):
        cache.lens.attribution(5)  # every verb: they all decode through the verified decoder


def test_sublayer_rows_are_refused_where_the_bridge_hooks_do_not_add_up():
    """Falcon-H1's bridge: the residual rows and logits verify, but input + ``hook_attn_out`` is not
    ``hook_resid_mid``, so sublayer rows, ``resid_mid`` rows and attribution would be wrong: they are refused
    with the reason, while the residual lens still runs and reproduces the model."""
    from lens_plugins.core.errors import LensNotImplementedError

    bridge, reference = bridge_and_reference("falcon_h1", "FalconH1ForCausalLM")
    _, cache = bridge.run_with_cache(TOKENS)
    attn_out = [cache[f"blocks.{i}.hook_attn_out"] for i in range(bridge.cfg.n_layers)]
    pre, mid = cache["blocks.0.hook_resid_pre"], cache["blocks.0.hook_resid_mid"]
    assert (pre + attn_out[0] - mid).abs().max() > 1e-3  # the premise: the hooks really do not add up
    for call in (lambda: cache.lens.logit_lens(tokens=TOKENS, sublayers=True),
                 lambda: cache.lens.logit_lens(tokens=TOKENS, resid_mid=True),
                 lambda: cache.lens.attribution(5, by="component")):
        with pytest.raises(LensNotImplementedError, match=r"input \+ attention write is not its hook_resid_mid"):
            call()
    result = cache.lens.logit_lens(tokens=TOKENS, top_k=3)
    assert (result.top_logprobs[-1] - reference.topk(3, dim=-1).values).abs().max() <= 1e-4
