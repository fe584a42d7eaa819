"""Future Lens: the identity at N = 1 and the last row is the logit lens exactly, training lowers the held-out
loss, save/load round-trips bit for bit, the pairing and bigram arithmetic."""

import pytest
import torch

from lens_plugins.lenses import future as fl
from lens_plugins.training import loop as train
from lens_plugins.core import future
from lens_plugins.methods.lens import logit_lens_from_stack
from tiny_models import VOCAB, random_tokens, tiny_model


class ModTokenizer:
    """The SmolLM2 tokenizer folded into the tiny models' 1000-id vocabulary."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [i % VOCAB for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_identity_at_n1_and_the_last_row_is_the_logit_lens_exactly(llama, smollm2_tokenizer):
    tokens = random_tokens(batch=2, seq=9)
    stack, labels = fl.residual_stack(llama, tokens)
    lens = fl.FutureLens(64, labels, n_ahead=1)  # untrained: every map is the identity
    sources, targets = future.future_pairs(stack, stack[-1], 1)
    mapped = lens.transform(sources, labels)
    assert torch.equal(mapped, sources) and torch.equal(mapped[-1], targets)
    # decoded through the readout, the mapped stack is the logit lens, field for field
    decoder = fl.hf_decoder(llama)
    ours = logit_lens_from_stack(mapped.reshape(stack.shape), labels, decoder, tokens, smollm2_tokenizer, top_k=5)
    theirs = logit_lens_from_stack(stack, labels, decoder, tokens, smollm2_tokenizer, top_k=5)
    for name in ("top_ids", "top_logprobs", "entropy", "kl_final_row", "final_top1", "next_token_logprob"):
        assert torch.equal(getattr(ours, name).nan_to_num(), getattr(theirs, name).nan_to_num()), name
    # ... and the logit lens's final row is the model's own logits
    with torch.no_grad():
        logits = llama(tokens).logits
    torch.testing.assert_close(theirs.top_logprobs[-1], logits.log_softmax(-1).topk(5).values, atol=1e-4, rtol=0)
    report = fl.evaluate(lens, llama, tokens)
    assert report.top1[-1] == 1 and report.kl[-1] == 0


def test_lens_result_is_the_logit_lens_at_n1_and_reads_ahead_at_n2(llama, smollm2_tokenizer):
    tokens = random_tokens(batch=2, seq=9)
    stack, labels = fl.residual_stack(llama, tokens)
    decoder = fl.hf_decoder(llama)
    ours = fl.lens_result(fl.FutureLens(64, labels, 1), llama, tokens, smollm2_tokenizer, targets=[17])
    theirs = logit_lens_from_stack(stack, labels, decoder, tokens, smollm2_tokenizer, targets=[17])
    assert ours.labels == theirs.labels and ours.positions == theirs.positions
    for name in ("top_ids", "top_logprobs", "entropy", "kl_final_row", "kl_row_final", "final_top1",
                 "final_top1_rank", "next_token_logprob", "next_token_rank", "target_logprobs", "target_ranks"):
        assert torch.equal(getattr(ours, name).nan_to_num(), getattr(theirs, name).nan_to_num()), name
    two = fl.lens_result(fl.FutureLens(64, ["embed", "2_post"], 2), llama, tokens, smollm2_tokenizer)
    assert two.positions == list(range(8)) and two.labels == ["embed", "2_post"]
    with torch.no_grad():
        own = llama(tokens).logits.argmax(-1)
    assert torch.equal(two.final_top1, own[:, 1:])  # the model's prediction of token t + 2, made at t + 1
    # next_token is the actual token t + 2: the identity map at 2_post decodes the state at t, so its rank of
    # token t + 2 is the logit lens's rank of that token at t
    lens = logit_lens_from_stack(stack, labels, decoder, tokens, smollm2_tokenizer,
                                 targets=[int(tokens[0, 5])], positions=[3])
    assert two.next_token_rank[1, 0, 3] == lens.target_ranks[-1, 0, 0, 0]
    assert (two.next_token_rank[:, :, -1] == -1).all()
    assert len(two.to_dataframe()) == 2 * 2 * 8


def test_transformer_lens_cache_gives_the_same_future_lens(llama, smollm2_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    from lens_plugins.backends import transformer_lens as tla

    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"),
                                                 tokenizer=smollm2_tokenizer).eval()
    tokens = random_tokens(batch=1, seq=8)
    lens = fl.FutureLens(64, ["embed", "1_pre", "2_post"], 2)
    with torch.no_grad():
        lens.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(0))
        _, cache = bridge.run_with_cache(tokens, names_filter=tla.hook_filter(bridge))
    theirs = fl.lens_result_from_stack(lens, *cache.lens.stack(), cache.lens.decoder(), tokens, smollm2_tokenizer)
    ours = fl.lens_result(lens, llama, tokens, smollm2_tokenizer)
    assert torch.equal(ours.top_ids, theirs.top_ids) and torch.equal(ours.final_top1, theirs.final_top1)
    torch.testing.assert_close(ours.top_logprobs, theirs.top_logprobs, atol=1e-4, rtol=0)


def test_the_model_residual_stack_matches_the_nnsight_lens_rows(llama, smollm2_tokenizer):
    """The hooks read the same rows as the in-trace lens (layer inputs, last output)."""
    from lens_plugins.backends import nnsight as lpn

    model = lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)
    tokens = random_tokens(batch=1, seq=6)
    with model.trace(tokens):
        lens = lpn.logit_lens(model, top_k=3)
    stack, labels = fl.residual_stack(llama, tokens)
    assert labels == lens["labels"]
    ours = logit_lens_from_stack(stack, labels, fl.hf_decoder(llama), tokens, smollm2_tokenizer, top_k=3)
    assert torch.equal(ours.top_ids, lens["stats"]["top_ids"].reshape(ours.top_ids.shape))


def test_a_future_lens_is_a_lens_on_every_entry_point(llama, smollm2_tokenizer):
    """The lens seam: ``lens=FutureLens`` on the pipeline decodes the same mapped rows as ``lens_result`` (which
    applies ``transform``; the pipeline applies ``affine``), and reaches a simulated remote trace as tensors."""
    import lens_plugins as lp
    from lens_plugins.backends import nnsight as lpn

    lens = fl.FutureLens(64, ["embed", "1_pre", "2_post"], 2)
    with torch.no_grad():
        lens.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(2))
        lens.bias.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
    assert isinstance(lens, lp.Lens)
    tokens = random_tokens(batch=1, seq=7)
    stack, labels = fl.residual_stack(llama, tokens)
    ahead = fl.lens_result(lens, llama, tokens, smollm2_tokenizer)
    piped = logit_lens_from_stack(stack, labels, fl.hf_decoder(llama), tokens, smollm2_tokenizer, lens=lens,
                                  layers=lens.labels, positions=ahead.positions)
    assert piped.labels == ahead.labels and piped.positions == ahead.positions
    assert torch.equal(piped.top_ids, ahead.top_ids)
    torch.testing.assert_close(piped.top_logprobs, ahead.top_logprobs, atol=1e-4, rtol=0)
    plain = logit_lens_from_stack(stack, labels, fl.hf_decoder(llama), tokens, smollm2_tokenizer,
                                  layers=lens.labels, positions=ahead.positions)
    assert not torch.equal(piped.top_logprobs, plain.top_logprobs)
    model = lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)
    local = lpn.run_logit_lens(model, "in it is the", lens=lens, layers=lens.labels)
    simulated = lpn.run_logit_lens(model, "in it is the", lens=lens, layers=lens.labels, remote="local")
    for name in ("top_ids", "top_logprobs", "entropy", "kl_final_row"):
        assert torch.equal(getattr(simulated, name), getattr(local, name)), name


def test_training_lowers_the_heldout_loss(llama, smollm2_tokenizer, tmp_path):
    texts = train.load_texts(None)[:30]
    config = train.TrainConfig(steps=12, batch_size=4, seed=3, checkpoint_every=6)
    lens, history, held, train_blocks = fl.train_future_lens(
        llama, ModTokenizer(smollm2_tokenizer), 2, layers=["embed", 1, -1], texts=texts, seq_len=24, config=config,
        checkpoint=tmp_path / "ckpt")
    assert lens.labels == ["embed", "1_pre", "2_post"] and len(history) == 12
    before = fl.evaluate(fl.FutureLens(64, lens.labels, 2), llama, held)
    after = fl.evaluate(lens, llama, held, bigram=fl.bigram_table(train_blocks, 2, VOCAB))
    assert (after.kl < before.kl).all(), (before.kl, after.kl)
    assert after.bigram_top1 is not None and 0 <= after.bigram_top1 <= 1
    assert all(p.requires_grad for p in llama.parameters()), "training must leave the model as it found it"


def test_save_load_round_trips_bit_for_bit(llama, tmp_path):
    lens = fl.FutureLens(64, ["embed", "2_post"], 3)
    with torch.no_grad():
        lens.weight.normal_(generator=torch.Generator().manual_seed(0))
        lens.bias.normal_(generator=torch.Generator().manual_seed(1))
    lens.save(tmp_path / "future.pt")
    loaded = fl.FutureLens.load(tmp_path / "future.pt")
    assert loaded.labels == lens.labels and loaded.n_ahead == 3
    assert torch.equal(loaded.weight, lens.weight) and torch.equal(loaded.bias, lens.bias)
    x = torch.randn(2, 5, 64)
    assert torch.equal(loaded.transform(x, ["embed", "2_post"]), lens.transform(x, ["embed", "2_post"]))
    weight, bias = loaded.affine(["2_post"], 64)
    assert torch.equal(weight[0], lens.weight[1]) and torch.equal(bias[0], lens.bias[1])
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a saved Future Lens"):
        fl.FutureLens.load(tmp_path / "other.pt")


def test_pairs_and_bigrams():
    stack = torch.arange(2 * 1 * 5 * 1, dtype=torch.float).reshape(2, 1, 5, 1)
    sources, targets = future.future_pairs(stack, stack[-1], 3)
    assert sources[:, :, 0].tolist() == [[0, 1, 2], [5, 6, 7]]
    assert targets[:, 0].tolist() == [7, 8, 9]  # position t + N - 1 of the final row
    blocks = torch.tensor([[1, 2, 1, 2, 1, 3], [4, 4, 4, 4, 4, 2]])
    table = future.bigram_table(blocks, 1, 6)
    assert table[1].item() == 2 and table[2].item() == 1 and table[4].item() == 4
    assert table[0].item() == table[5].item() == 4  # never seen: the most frequent successor overall
    with pytest.raises(ValueError, match="n_ahead must be at least 1"):
        future.future_pairs(stack, stack[-1], 0)


def test_unknown_rows_are_refused():
    lens = fl.FutureLens(8, ["embed"], 1)
    with pytest.raises(KeyError, match="no map for rows"):
        lens.transform(torch.zeros(1, 2, 8), ["3_pre"])
    with pytest.raises(ValueError, match="not a row label"):
        fl.FutureLens(8, ["layer3"], 1)
