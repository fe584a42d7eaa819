"""Cross-model Patchscopes: the same model with the identity map is the same-model Patchscope exactly on both
backends; a planted map between two tiny models (one a rotated and scaled copy of the other) is recovered
and makes the copy read the original as the original reads itself; two tokenizations of one string pair
where a hand count says; the map saves and loads; bad input is refused alike."""

import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.core import cross_model as arithmetic
from lens_plugins.methods import cross_model as cm
from lens_plugins.methods.patchscope import IDENTITY_PROMPT
from tiny_models import random_tokens, tiny_model

# Words whose SmolLM2 ids are all below the tiny models' vocabulary of 1000.
TEXT = "in the of to and is at the in a b c"
TARGET = "a b c a b c at"  # the tiny models' target prompt (the token-identity prompt's ids are above 1000)
FIELDS = ("top_ids", "top_logprobs", "final_top1", "entropy", "kl_final_row", "kl_row_final", "final_top1_rank",
          "next_token_rank", "next_token_logprob")
SCALE = 2.0


def rotated_copy(model, q, scale):
    """A Llama whose residual stream is ``scale * q @ h`` of ``model``'s at every row and whose logits are the
    same: norms' weights folded into the matrices that read the normed stream (RMS norms commute with a
    rotation and, eps aside, cancel the scale), every write into the stream rotated and scaled."""
    import copy

    copied = copy.deepcopy(model)
    m = scale * q
    with torch.no_grad():
        embed = copied.model.embed_tokens.weight
        embed.copy_(embed @ m.T)

        def read(linears, norm):
            for linear in linears:
                linear.weight.copy_(linear.weight * norm.weight[None] @ q.T)
            norm.weight.fill_(1.0)

        for layer in copied.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            read([attn.q_proj, attn.k_proj, attn.v_proj], layer.input_layernorm)
            read([mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm)
            for writer in (attn.o_proj, mlp.down_proj):
                writer.weight.copy_(m @ writer.weight)
                if writer.bias is not None:
                    writer.bias.copy_(m @ writer.bias)
        read([copied.lm_head], copied.model.norm)
    return copied.eval()


@pytest.fixture(scope="module")
def q():
    generator = torch.Generator().manual_seed(3)
    return torch.linalg.qr(torch.randn(64, 64, generator=generator))[0]


@pytest.fixture(scope="module")
def pair(smollm2_tokenizer, q):
    """(original, rotated copy) tiny Llamas, on each backend: {backend: (source, target)}."""
    from transformer_lens.model_bridge import TransformerBridge

    original = tiny_model("llama", optional_biases=False)
    copy = rotated_copy(original, q, SCALE)
    import copy as copying

    bridges = tuple(TransformerBridge.boot_transformers("tiny-llama", hf_model=copying.deepcopy(m),
                                                        tokenizer=smollm2_tokenizer).eval() for m in (original, copy))
    return {"transformer_lens": bridges,
            "nnsight": (lpn.wrap_model(original, smollm2_tokenizer), lpn.wrap_model(copy, smollm2_tokenizer))}


def assert_same(ours, theirs, atol=0.0):
    for name in FIELDS:
        a, b = getattr(ours, name), getattr(theirs, name)
        if a.is_floating_point() and atol:
            torch.testing.assert_close(a, b, atol=atol, rtol=0, equal_nan=True, msg=name)
        else:
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), name


def test_the_rotated_copy_is_the_same_model(pair, q):
    """The fixture's premise: every residual row of the copy is ``2 q h`` of the original's, the logits agree."""
    from lens_plugins.backends.hf import hf_model, residual_stack

    source, target = (hf_model(m) for m in pair["nnsight"])
    tokens = random_tokens(1, 9)
    h_source, h_target = residual_stack(source, tokens), residual_stack(target, tokens)
    torch.testing.assert_close(h_target, SCALE * h_source @ q.T, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(target(tokens).logits, source(tokens).logits, atol=1e-3, rtol=0)


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_same_model_and_identity_map_is_the_same_model_patchscope_exactly(pair, backend):
    model = pair[backend][0]
    own = lp.patchscope(model, TEXT, layers=[0, 2], top_k=4, targets=[" the"], target_prompt=TARGET)
    read = lp.patchscope(model, TEXT, layers=[0, 2], top_k=4, targets=[" the"], target_prompt=TARGET, target_model=model)
    assert read.positions == own.positions and torch.equal(read.token_ids, own.token_ids)
    assert_same(read, own)
    # ... and so is a fitted-map-free identity given as a per-row dict of (I, 0)
    eye = {label: (torch.eye(64), torch.zeros(64)) for label in own.labels}
    assert_same(lp.patchscope(model, TEXT, layers=[0, 2], top_k=4, targets=[" the"], target_prompt=TARGET, target_model=model,
                              mapping=eye), own, atol=1e-5)


@pytest.fixture(scope="module")
def fitted(pair):
    blocks = random_tokens(10, 24, seed=5)
    return cm.fit_mapping(*pair["nnsight"], blocks, heldout=0.2)


def test_a_planted_map_is_recovered(fitted, q):
    """Row to same row, the fit finds ``2 q`` (not its transpose: q is no symmetric matrix) and no bias, and
    explains the held-out rows entirely; the per-pair counts are the blocks'."""
    assert fitted.source_labels == fitted.target_labels == ["embed", "1_pre", "2_pre", "2_post"]
    assert (fitted.pairs_kept, fitted.tokens, fitted.heldout_pairs) == (230, 240, 46)  # the first of each block left out
    for label in fitted.source_labels:
        weight, bias = fitted.mapping(label, label)
        torch.testing.assert_close(weight, SCALE * q, atol=2e-3, rtol=0)
        assert bias.abs().max() < 2e-3
    assert (fitted.r2.diagonal() > 0.9999).all()
    assert (fitted.r2[0, 1:] < 0.99).all()  # the embeddings do not predict later rows: R^2 tells pairs apart


def test_the_fit_is_the_same_on_both_backends(pair, fitted):
    other = cm.fit_mapping(*pair["transformer_lens"], random_tokens(10, 24, seed=5), heldout=0.2)
    assert other.source_labels == fitted.source_labels and other.pairs_kept == fitted.pairs_kept
    torch.testing.assert_close(other.weight, fitted.weight, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(other.r2, fitted.r2, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_the_copy_reads_the_original_as_the_original_reads_itself(pair, fitted, backend):
    source, target = pair[backend]
    own = lp.patchscope(source, TEXT, layers=[1], target_layer="1_pre", top_k=3, target_prompt=TARGET,
                        mapping={label: (torch.eye(64), torch.zeros(64)) for label in ("1_pre", "2_post")})
    read = lp.patchscope(source, TEXT, layers=[1], target_layer="1_pre", top_k=3, target_model=target, target_prompt=TARGET,
                         mapping=fitted.mappings("1_pre"))
    # row 0 only: the final row is written through the map fitted from 2_post to 1_pre, not the identity
    assert torch.equal(read.top_ids[0], own.top_ids[0]) and torch.equal(read.final_top1, own.final_top1)
    torch.testing.assert_close(read.top_logprobs[0], own.top_logprobs[0], atol=2e-3, rtol=0)


def test_backends_agree_on_the_cross_model_scores(pair, fitted):
    scores = {b: cm.cross_model_scores(*pair[b], fitted, [TEXT, "a b c d e f"], target_prompt=TARGET) for b in pair}
    tl, nn = scores["transformer_lens"], scores["nnsight"]
    assert tl.positions == nn.positions == 12 + 6
    assert torch.equal(tl.precision_at_1, nn.precision_at_1)
    # the diagonal is the same-model Patchscope's agreement with the model's own top-1
    source = pair["nnsight"][0]
    for t, label in enumerate(fitted.target_labels):
        hits = sum(int(lp.patchscope(source, text, layers=[label], target_layer=label, top_k=1, target_prompt=TARGET).top1_agreement()[0].sum())
                   for text in [TEXT, "a b c d e f"])
        assert tl.precision_at_1[t, t] == hits / 18
    frame = tl.to_dataframe()
    assert len(frame) == 16 and set(frame.columns) == {"source_row", "target_row", "precision_at_1", "r2"}
    figure = tl.plot()
    assert len(figure.data) == 2 and list(figure.data[0].y) == fitted.source_labels


def test_save_and_load(fitted, tmp_path):
    path = tmp_path / "map.pt"
    fitted.save(path)
    loaded = cm.CrossModelMap.load(path)
    for name in cm.CrossModelMap.__dataclass_fields__:
        value = getattr(fitted, name)
        assert torch.equal(getattr(loaded, name), value) if isinstance(value, torch.Tensor) else getattr(loaded, name) == value
    with pytest.raises(lp.LensError, match="already holds|overwrite"):
        fitted.save(path)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(lp.LensError, match="not a cross-model map"):
        cm.CrossModelMap.load(tmp_path / "other.pt")


def char_tokenizer():
    """A character-level fast tokenizer built offline (no hub): each character one token, offsets (i, i+1)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.!?'"))
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                   unk_token="<unk>", bos_token="<s>")


def test_two_tokenizations_pair_where_a_hand_count_says(smollm2_tokenizer):
    """SmolLM2 cuts "Hello world, hi" as Hello | ␣world | , | ␣hi (ends 5, 11, 12, 15); a character tokenizer
    ends a token at every character: 4 pairs, at character positions 4, 10, 11, 14."""
    text = "Hello world, hi"
    chars = char_tokenizer()
    pairs = cm.text_pairs(smollm2_tokenizer, chars, text)
    assert [smollm2_tokenizer.decode([i]) for i in pairs.source_ids] == ["Hello", " world", ",", " hi"]
    assert len(pairs.target_ids) == 15
    assert pairs.source_index.tolist() == [0, 1, 2, 3] and pairs.target_index.tolist() == [4, 10, 11, 14]
    reverse = cm.text_pairs(chars, smollm2_tokenizer, text)
    assert reverse.source_index.tolist() == [4, 10, 11, 14] and reverse.target_index.tolist() == [0, 1, 2, 3]
    assert pairs.source_positions([10, 14]) == [1, 3]
    with pytest.raises(lp.LensError, match=r"target positions \[5\] end no source token"):
        pairs.source_positions([5])
    # an added BOS spells no text: it pairs with nothing
    with_bos = cm.text_pairs(smollm2_tokenizer, chars, text, prepend_bos=True)
    assert with_bos.source_ids[0] == smollm2_tokenizer.bos_token_id and with_bos.target_ids[0] == 1
    assert with_bos.source_index.tolist() == [1, 2, 3, 4] and with_bos.target_index.tolist() == [5, 11, 12, 15]


def test_core_pairing_keeps_the_last_token_of_a_split_character():
    # two byte tokens of one character end at the same offset: the second has read all of it
    source, target = arithmetic.aligned_pairs([-1, 3, 4, 4, 9], [2, 4, 9])
    assert source.tolist() == [3, 4] and target.tolist() == [1, 2]


def test_fit_across_tokenizers_counts_the_pairs(smollm2_tokenizer):
    """A character-level tiny model read by one with SmolLM2's tokenizer: the fit keeps one pair per SmolLM2
    token (each ends at a character), of all the characters read; with ``skip_first=False`` the first too."""
    texts = ["in the of to and is at", "a b c d e f the in", "at is and to of the", "a b c in at"]
    source = lpn.wrap_model(tiny_model("llama", seed=1), char_tokenizer())
    target = lpn.wrap_model(tiny_model("qwen2", seed=2), smollm2_tokenizer)
    fitted = cm.fit_mapping(source, target, texts, ridge=1.0, heldout=0.25)
    assert fitted.tokens == sum(len(t) for t in texts)
    # every SmolLM2 token but each window's first (skip_first: the attention sink)
    assert fitted.pairs_kept == sum(len(smollm2_tokenizer(t)["input_ids"]) - 1 for t in texts) == 6 + 7 + 5 + 4
    assert fitted.heldout_pairs == 4  # the last window: "a b c in at"
    every = cm.fit_mapping(source, target, texts, ridge=1.0, heldout=0.25, skip_first=False)
    assert every.pairs_kept == 7 + 8 + 6 + 5 and every.heldout_pairs == 5
    read = lp.patchscope(source, "in the of to", target_model=target, target_layer=2,
                         mapping=fitted.mappings(2), top_k=2, target_prompt=TARGET)
    assert read.token_ids[0].tolist() == smollm2_tokenizer("in the of to")["input_ids"]
    assert read.positions == [0, 1, 2, 3] and read.labels == ["embed", "1_pre", "2_pre", "2_post"]


def test_bad_input_is_refused_alike(pair):
    for source, target in pair.values():
        with pytest.raises(lp.LensError, match="pass the source prompt as text"):
            lp.patchscope(source, torch.tensor([[5, 6, 7]]), target_model=target, target_prompt=TARGET)
        with pytest.raises(lp.LensError, match="mapping has no entry for source rows"):
            lp.patchscope(source, TEXT, target_model=target, target_prompt=TARGET, target_layer=1, mapping={"embed": None})
        with pytest.raises(lp.LensError, match="must keep the shape"):
            lp.patchscope(source, TEXT, target_model=target, target_prompt=TARGET, target_layer=1, layers=[1],
                          mapping=(torch.zeros(32, 64), None))
        with pytest.raises(lp.LensError, match="out of range|no row"):
            lp.patchscope(source, TEXT, target_model=target, target_prompt=TARGET, target_layer=9)
    with pytest.raises(lp.LensError, match="target_model runs on"):
        lp.patchscope(pair["nnsight"][0], TEXT, target_model=pair["transformer_lens"][1], target_prompt=TARGET)
    with pytest.raises(lp.LensError, match="cannot determine an affine map"):
        arithmetic.affine_solve(torch.randn(10, 64), torch.randn(10, 64))
    assert IDENTITY_PROMPT  # the default target prompt is the token-identity one
