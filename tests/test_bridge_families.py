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
from lens_plugins.backends.transformer_lens.reader import decoder_for, output_scale
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
