"""Vision-language models: the lens, sublayer rows, attribution and attention over the language model of tiny
random VLMs (``tiny_vlms``: seeded, 2 layers, their own processors built offline) run on a real PIL picture.

Checked against the model's own numbers with the image in the prompt: every residual row the in-trace reader
produces equals ``output_hidden_states``, the last row's decoding equals the model's logits, the image really
reaches the rows (another picture changes them), the TransformerLens bridge (where 4.3 has an adapter) gives the
same lens, and the image positions are labelled by their patch in the grid the model used.
"""

import math

import pytest
import torch
from tiny_vlms import BRIDGE_FAMILIES, FAMILIES, inputs_for, picture, tiny_vlm

import lens_plugins as lp
from lens_plugins.core import architectures, verification
from lens_plugins.core.rows import Row, plan
from lens_plugins.core.trace.reader import reader
from lens_plugins.methods import vision

TOL = 1e-4
# Three families run in the quick suite (a square grid, Gemma 3's pooled tokens with sandwich norms, Qwen2-VL's
# merged grid and M-RoPE); the other four are as thorough and slower together (``make test-heavy``).
QUICK = ("llava", "gemma3", "qwen2_vl")
FAMILY_NAMES = [name if name in QUICK else pytest.param(name, marks=pytest.mark.heavy) for name in FAMILIES]
# (rows, cols) of each family's grids for picture() (48 x 40): from the processor's own arithmetic
GRIDS = {
    "llava": [(4, 4)],                 # 32 / 8 patches a side, CLS dropped
    "llava_next": [(4, 4), (4, 5)],    # base 4 x 4; detail: 1 x 2 tiles of 4 x 4 unpadded to 4 x 4, + newline
    "gemma3": [(2, 2)],                # 16 patches pooled to mm_tokens_per_image = 4
    "paligemma": [(4, 4)],
    "qwen2_vl": [(2, 3)],              # resized to 32 x 48: 4 x 6 patches merged 2 x 2
    "qwen2_5_vl": [(2, 3)],
    "idefics3": [(2, 2)] * 5,          # 4 tiles and the global image, 16 patches each shuffled by scale 2
}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):
    model, processor = tiny_vlm(request.param)
    inputs = inputs_for(request.param, processor)
    return request.param, model, processor, inputs, wrapped(model, processor)


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True)


def wrapped(model, processor):
    """The nnsight model; with the family's own processor class, task image-text-to-text (``QwenProcessor``
    stands in for one: text-generation, inputs given whole)."""
    import transformers

    real = isinstance(processor, transformers.ProcessorMixin)
    return lp.nnsight.wrap_model(model, processor.tokenizer, processor if real else None)


def test_rows_and_logits_equal_the_models_own_with_the_image(family):
    name, model, _, inputs, nn_model = family
    spec = verification.resolve(model)  # verified at first use (a text forward), not refused
    assert spec["layers"].endswith("layers") and "vision" not in spec["layers"]
    out = forward(model, inputs)
    n = len(architectures.get_path(model, spec["layers"]))
    rows = plan(n, False, False, False)
    with nn_model.trace(dict(inputs)):
        stack = reader(nn_model, spec)(rows).save()
    assert len(out.hidden_states) == n + 1
    for i in range(n):  # every block's input is output_hidden_states[i], image positions included
        assert verification.mismatch(stack[i], out.hidden_states[i]) <= TOL, (name, i)
    decoder = architectures.decoder_tensors(model, spec)
    with torch.no_grad():
        logits = decoder.unembed(decoder.normalize(stack[-1]))
    assert verification.mismatch(logits, out.logits) <= TOL, name


def test_the_image_reaches_the_language_model(family):
    """Another picture changes the rows at the image's positions (and not the text before it)."""
    name, model, processor, inputs, _ = family
    other = inputs_for(name, processor, picture().rotate(90, expand=False).transpose(0))
    assert torch.equal(other["input_ids"], inputs["input_ids"])
    a, b = forward(model, inputs).hidden_states[1], forward(model, other).hidden_states[1]
    grids = vision.image_grids(model, inputs)
    image = grids[0].positions
    assert (a[0, image] - b[0, image]).abs().max() > 1e-3
    assert torch.allclose(a[0, :image[0]], b[0, :image[0]], atol=1e-6)


def test_one_call_lens_decodes_the_models_logits_and_labels_the_patches(family):
    name, model, _, inputs, nn_model = family
    out = forward(model, inputs)
    result = lp.nnsight.run_logit_lens(nn_model, inputs, top_k=5)
    logprobs = out.logits[0].float().log_softmax(-1)
    top = logprobs.topk(5, dim=-1)
    assert torch.equal(result.top_ids[-1, 0], top.indices)
    assert (result.top_logprobs[-1, 0] - top.values).abs().max() <= 1e-4
    grids = vision.image_grids(model, inputs)
    assert [(g.rows, g.cols) for g in grids] == GRIDS[name]
    labelled = vision.label_image_tokens(result, grids)
    tokens = labelled.str_tokens(0)
    several = len(grids) > 1
    for grid in grids:
        assert len(grid.positions) == grid.rows * grid.cols
        first, last = grid.positions[0], grid.positions[-1]
        prefix = f"{grid.image} {grid.part}: " if grid.part else f"{grid.image}: " if several else ""
        assert tokens[first] == f"<image {prefix}0,0>"
        end = "↵" if grid.newline else grid.cols - 1
        assert tokens[last] == f"<image {prefix}{grid.rows - 1},{end}>"
    text = [p for p in range(len(tokens)) if all(p not in g.positions for g in grids)]
    assert [tokens[p] for p in text] == [result.str_tokens(0)[p] for p in text]


def test_a_trace_given_text_and_images_runs_the_processor():
    """In-trace with a processor: ``model.trace(text, images=[picture])`` lenses what the processor made."""
    model, processor = tiny_vlm("llava")
    nn_model = wrapped(model, processor)
    with nn_model.trace(FAMILIES["llava"][0], images=[picture()]):
        saved = lp.nnsight.logit_lens(nn_model, top_k=3)
    traced = lp.nnsight.logit_lens_result(saved, nn_model)
    expected = lp.nnsight.run_logit_lens(nn_model, inputs_for("llava", processor), top_k=3)
    assert torch.equal(traced.token_ids, expected.token_ids)
    assert torch.equal(traced.top_ids, expected.top_ids)


def test_a_saved_model_lensed_through_nnsights_remote_serialisation(tmp_path):
    """The NDIF route rehearsed here (``remote="local"``: the request serialised as for a server, then run):
    a VLM saved with its processor, opened with ``remote_model(path, task="image-text-to-text")`` (no weights
    loaded), gives the in-memory model's lens. ``tests_ndif/test_remote_vision.py`` runs it on the server."""
    model, processor = tiny_vlm("llava")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    remote = lp.nnsight.remote_model(str(tmp_path), task="image-text-to-text")
    assert {p.device.type for p in remote._module.parameters()} == {"meta"}
    inputs = inputs_for("llava", processor)
    serialised = lp.nnsight.run_logit_lens(remote, inputs, remote="local", top_k=3)
    expected = lp.nnsight.run_logit_lens(wrapped(model, processor), inputs, top_k=3)
    assert torch.equal(serialised.top_ids, expected.top_ids)
    assert (serialised.top_logprobs - expected.top_logprobs).abs().max() <= 1e-5


def test_in_trace_lens_equals_the_one_call_form(family):
    _, _, _, inputs, nn_model = family
    with nn_model.trace(dict(inputs)):
        saved = lp.nnsight.logit_lens(nn_model, top_k=3)
    traced = lp.nnsight.logit_lens_result(saved, nn_model)
    one_call = lp.nnsight.run_logit_lens(nn_model, inputs, top_k=3)
    assert torch.equal(traced.top_ids, one_call.top_ids)
    assert torch.equal(traced.top_logprobs, one_call.top_logprobs)


@pytest.mark.parametrize("name", [n if n == "llava" else pytest.param(n, marks=pytest.mark.heavy)
                                  for n in BRIDGE_FAMILIES])
def test_transformer_lens_bridge_gives_the_same_lens(name):
    """Both backends: TransformerLens 4.3's bridge (it has adapters for these five) and nnsight agree."""
    from transformer_lens.model_bridge import TransformerBridge

    if name == "qwen2_5_vl":  # TransformerLens's Qwen2.5-VL adapter imports torchvision (its 'multimodal' group)
        pytest.importorskip("torchvision")

    model, processor = tiny_vlm(name)
    inputs = inputs_for(name, processor)
    expected = lp.nnsight.run_logit_lens(wrapped(model, processor), inputs, top_k=5)
    copy, _ = tiny_vlm(name)  # booting rewires the module tree: a copy with the same seed and weights
    bridge = TransformerBridge.boot_transformers(f"tiny-{name}", hf_model=copy, tokenizer=processor.tokenizer).eval()
    result = lp.transformer_lens.run_logit_lens(bridge, inputs, top_k=5)
    assert result.labels == expected.labels
    assert torch.equal(result.top_ids, expected.top_ids)
    assert (result.top_logprobs - expected.top_logprobs).abs().max() <= 1e-4
    assert [(g.rows, g.cols) for g in vision.image_grids(bridge, inputs)] == GRIDS[name]


@pytest.mark.parametrize("name", QUICK)
def test_sublayers_attribution_and_attention_over_the_image_prompt(name):
    model, processor = tiny_vlm(name)
    inputs = inputs_for(name, processor)
    nn_model = wrapped(model, processor)
    out = forward(model, inputs)
    spec = verification.resolve(model)
    n = len(architectures.get_path(model, spec["layers"]))
    rows = [Row(layer, site) for layer in range(n) for site in ("pre", "attn_out", "mlp_out")] + [Row(n - 1, "post")]
    with nn_model.trace(dict(inputs)):
        stack = reader(nn_model, spec)(rows).save()
    labels = [r.label for r in rows]
    for layer in range(n):  # block input + attention write + MLP write = block output
        pre, attn, mlp = (stack[labels.index(f"{layer}_{s}")] for s in ("pre", "attn_out", "mlp_out"))
        post = out.hidden_states[layer + 1] if layer + 1 < n else stack[labels.index(f"{layer}_post")]
        assert verification.mismatch(pre + attn + mlp, post) <= TOL
    target, distractor = (int(i) for i in out.logits[0, -1].topk(2).indices)
    dla = lp.nnsight.run_attribution(nn_model, inputs, target, distractor)
    model_diff = out.logits[0, -1, target] - out.logits[0, -1, distractor]
    assert dla.error.abs().max() <= 1e-4 * max(1.0, float(model_diff.abs()))
    assert abs(float(dla.model_value[0]) - float(model_diff)) <= 1e-4 * max(1.0, float(model_diff.abs()))
    attention = lp.nnsight.run_attention(nn_model, inputs)
    with torch.no_grad():
        theirs = model(**inputs, output_attentions=True).attentions
    for layer in range(n):
        assert (attention.patterns[layer, 0] - theirs[layer][0].float()).abs().max() <= 1e-5
    labelled = vision.label_image_tokens(attention, vision.image_grids(model, inputs))
    assert labelled.str_tokens(0)[vision.image_grids(model, inputs)[0].positions[0]].startswith("<image ")


def test_figure_shows_the_lens_over_the_patch_grid():
    from lens_plugins.plot.vision import grid_values, image_lens_figure

    model, processor = tiny_vlm("qwen2_vl")
    inputs = inputs_for("qwen2_vl", processor)
    result = lp.nnsight.run_logit_lens(wrapped(model, processor), inputs)
    grids = vision.image_grids(model, inputs)
    figure = image_lens_figure(vision.label_image_tokens(result, grids), grids, row=0, image=picture())
    probs = result.top_logprobs[0, 0, :, 0].exp()
    drawn = grid_values(figure)
    grid = grids[0]
    for index, position in enumerate(grid.positions):
        assert math.isclose(drawn[index // grid.cols][index % grid.cols], float(probs[position]), rel_tol=1e-6)
    last = figure.layout.sliders[0].steps[-1].args[0]["z"][0]  # the slider's last step: the final row
    final = result.top_logprobs[-1, 0, :, 0].exp()
    assert math.isclose(last[1][2], float(final[grid.positions[5]]), rel_tol=1e-6)


def test_bad_image_inputs_are_refused_by_name():
    model, processor = tiny_vlm("llava")
    inputs = inputs_for("llava", processor)
    with pytest.raises(lp.LensError, match="no image token"):
        vision.image_grids(model, processor.tokenizer("no picture here", return_tensors="pt"))
    with pytest.raises(lp.LensError, match="needs input_ids"):
        lp.nnsight.run_logit_lens(wrapped(model, processor), {"pixel_values": inputs["pixel_values"]})
    from tiny_models import tiny_model

    with pytest.raises(lp.LensError, match="no image token id"):
        vision.image_grids(tiny_model("llama"), inputs)


def test_smolvlm_passes_the_check_and_mllama_is_refused_by_name():
    """The table's other two rows: SmolVLM (Idefics3's layout) verifies; Mllama's cross-attention blocks do not
    run in a text forward, so the check refuses it naming them (no patch positions to label either way)."""
    import transformers as T

    from lens_plugins.core import discovery

    text = T.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    smolvlm = T.SmolVLMForConditionalGeneration(T.SmolVLMConfig(
        text_config=text, vision_config=T.SmolVLMVisionConfig(**vision), image_token_id=999, scale_factor=2)).eval()
    verdict = verification.verify(smolvlm, discovery.discover(smolvlm))
    assert verdict["refused"] is None and verdict["spec"]["layers"] == "model.text_model.layers"
    mllama = T.MllamaForConditionalGeneration(T.MllamaConfig(
        text_config=T.MllamaTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                                       pad_token_id=0),
        vision_config=T.MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_global_layers=1, attention_heads=2, image_size=32, patch_size=8,
                                           max_num_tiles=4, vision_output_dim=64, intermediate_layers_indices=[0]),
        image_token_index=999)).eval()
    refused = verification.verify(mllama, discovery.discover(mllama))["refused"]
    assert refused is not None and "blocks [1] of the layer list did not run" in refused
