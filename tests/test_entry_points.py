"""Entry points and paths the README promises that no other test reaches (issue 18, item 7)."""

import base64
import json
import re

import numpy as np
import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends._common import pad_batch
from lens_plugins.plot import display_token, metric_values
from tiny_models import random_tokens, tiny_model

PROMPT = "in it is the"  # ids below the tiny vocabulary's 1000


def tiny_bridge(family, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(f"tiny-{family}", hf_model=tiny_model(family), tokenizer=tokenizer).eval()


@pytest.fixture(scope="module")
def gpt2_bridge(smollm2_tokenizer):
    return tiny_bridge("gpt2", smollm2_tokenizer)


def test_transformer_lens_run_attribution_is_the_cache_attribution(gpt2_bridge):
    """The one-call form caches what attribution reads and gives exactly the accessor's numbers (a ragged
    batch padded on the left, so that position -1 is every prompt's last token)."""
    one_call = lp.transformer_lens.run_attribution(gpt2_bridge, [PROMPT, "is the"], " the", " a", by="layer",
                                                   padding_side="left")
    sequences = [gpt2_bridge.to_tokens(p, prepend_bos=False)[0] for p in (PROMPT, "is the")]  # as the tokenizer
    tokens, mask = pad_batch(sequences, gpt2_bridge.tokenizer.pad_token_id, "left")
    _, cache = gpt2_bridge.run_with_cache(tokens, attention_mask=mask,
                                          names_filter=lp.transformer_lens.hook_filter(gpt2_bridge, attribution=True))
    by_hand = cache.lens.attribution(" the", " a", by="layer", attention_mask=mask)
    assert one_call.labels == by_hand.labels == ["embed", "pos_embed", "layer 0", "layer 1", "layer 2"]
    torch.testing.assert_close(one_call.values, by_hand.values, atol=0, rtol=0)
    torch.testing.assert_close(one_call.explained, by_hand.explained, atol=0, rtol=0)
    assert one_call.target_names == [" the"] and one_call.distractor_names == [" a"]
    with torch.no_grad():
        logits = gpt2_bridge(tokens, attention_mask=mask)[:, -1]
    the, a = gpt2_bridge.to_single_token(" the"), gpt2_bridge.to_single_token(" a")
    torch.testing.assert_close(one_call.model_value, logits[:, the] - logits[:, a], atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt, message", [("", "the prompt is empty"), ("  \n", "the prompt is empty"),
                                             ([], r"the prompt is empty \(an empty list\)"),
                                             ([PROMPT, " "], r"prompt 1 of the batch is empty")])
@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_attribution_one_call_forms_refuse_an_empty_prompt(backend, prompt, message, gpt2_bridge, smollm2_tokenizer):
    if backend == "transformer_lens":
        run, model = lp.transformer_lens.run_attribution, gpt2_bridge
    else:
        run, model = lp.nnsight.run_attribution, lpn.wrap_model(tiny_model("gpt2"), smollm2_tokenizer)
    with pytest.raises(ValueError, match=message):
        run(model, prompt, " the", " a")


@pytest.fixture(scope="module")
def lens_result(gpt2_bridge):
    return lp.transformer_lens.run_logit_lens(gpt2_bridge, [PROMPT, "is the it"], top_k=3, targets=[" the"],
                                              token_sets={"it": [" it", "it"]})


def test_to_dataframe_holds_every_row_position_and_value(lens_result):
    result = lens_result
    df = result.to_dataframe()
    rows, batch, pos = result.entropy.shape
    assert len(df) == rows * batch * pos
    assert list(df["row"].unique()) == result.labels
    # Records run row-major over (row, batch, position): the frame's columns are the flattened fields.
    np.testing.assert_array_equal(df["entropy"].to_numpy(), result.entropy.flatten().numpy())
    np.testing.assert_array_equal(df["kl_final_row"].to_numpy(), result.kl_final_row.flatten().numpy())
    np.testing.assert_allclose(df["top1_prob"].to_numpy(), result.top_logprobs[..., 0].exp().flatten().numpy(), rtol=1e-6)
    assert df["top1"].tolist() == [result.token(i) for i in result.top_ids[..., 0].flatten().tolist()]
    assert df["rank[ the]"].tolist() == result.target_ranks[..., 0].flatten().tolist()
    np.testing.assert_array_equal(df["logprob[ the]"].to_numpy(), result.target_logprobs[..., 0].flatten().numpy())
    np.testing.assert_allclose(df["set_prob[it]"].to_numpy(), result.set_logprobs[..., 0].exp().flatten().numpy(), rtol=1e-6)
    first = df.iloc[pos * batch * (rows - 1) + pos + 1]  # last row, prompt 1, position 1
    assert (first["row"], first["batch"], first["pos"]) == (result.labels[-1], 1, result.positions[1])
    assert first["input_token"] == result.token(result.token_ids[1, result.positions[1]])


def _plotly_array(value):
    """A plotly JSON array: a list, or (plotly 6) ``{"dtype", "bdata"[, "shape"]}`` base64 typed data."""
    if isinstance(value, dict):
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        return array.reshape([int(n) for n in str(shape).split(",")]) if shape else array
    return np.array(value, dtype=float)


@pytest.mark.parametrize("metric", ["prob", "entropy", "rank[ the]"])
def test_to_html_is_a_standalone_page_of_the_results_values(metric, lens_result, tmp_path):
    result = lens_result
    path = tmp_path / "lens.html"
    result.to_html(str(path), metric=metric, batch=1)
    page = path.read_text(encoding="utf-8")
    assert "plotly.js v" in page and not re.search(r"<script[^>]+src=", page)  # plotly inlined: works offline
    call = page.index("Plotly.newPlot(")
    start = page.index("[", call)
    data, end = json.JSONDecoder().raw_decode(page[start:])
    layout, _ = json.JSONDecoder().raw_decode(page[start + end:].lstrip(", "))
    heatmap = data[0]
    assert heatmap["type"] == "heatmap" and list(heatmap["y"]) == list(range(len(result.labels)))
    assert layout["yaxis"]["ticktext"] == result.labels
    z = _plotly_array(heatmap["z"]).reshape(len(result.labels), -1)
    expected = metric_values(result, metric)[:, 1]
    if metric.startswith("rank"):
        expected = torch.where(expected >= 1, expected.clamp(min=1).log10(), torch.full_like(expected, float("nan")))
    np.testing.assert_allclose(z, expected.numpy(), rtol=1e-6)
    cell = heatmap["text"][-1][-1]  # the final row at the last position: its top-1, as the figure writes tokens
    assert cell and display_token(result.token(result.top_ids[-1, 1, -1, 0])).startswith(cell.removesuffix("…"))


def test_same_width_cache_from_another_model_is_refused_without_hook_embed(smollm2_tokenizer):
    """The README's refusal is unconditional: with ``hook_embed`` left out of the cache and ``tokens=``
    passed, the embedding row itself (less the positional embeddings) must still give the model away."""
    for family, other in (("gpt2", "gpt_neo"), ("llama", "qwen2")):
        model, stranger = tiny_bridge(family, smollm2_tokenizer), tiny_bridge(other, smollm2_tokenizer)
        tokens = random_tokens()
        for keep in (lambda name: "resid" in name, lambda name: "resid" in name or name == "hook_pos_embed"):
            _, cache = model.run_with_cache(tokens, names_filter=keep)
            assert "hook_embed" not in cache.cache_dict
            own = cache.lens.logit_lens(tokens=tokens)  # its own model: accepted
            assert own.labels[-1] == "2_post"
            cache.model = stranger  # same width, other weights
            with pytest.raises(ValueError, match=r"embedding row \(blocks\.0\.hook_resid_pre\) is not this model's "
                                                 r"embedding of the tokens.*different model"):
                cache.lens.logit_lens(tokens=tokens)


def test_embedding_row_check_follows_padding_positions(gpt2_bridge):
    """Left padding renumbers GPT-2's positions from each prompt's first real token; the check must use the
    positions the model used, and ignore the padding itself."""
    result = lp.transformer_lens.run_logit_lens(gpt2_bridge, [PROMPT, "in"], padding_side="left", top_k=1)
    tokens, mask = result.token_ids, result.attention_mask
    _, cache = gpt2_bridge.run_with_cache(tokens, attention_mask=mask, names_filter=lambda name: "resid" in name)
    by_hand = cache.lens.logit_lens(tokens=tokens, attention_mask=mask, top_k=1)
    torch.testing.assert_close(by_hand.entropy, result.entropy, atol=1e-5, rtol=0)
