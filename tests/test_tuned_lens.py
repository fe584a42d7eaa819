"""The tuned lens: checkpoint format, decoding, the tiled training loss, training, evaluation, the variant
decoder, and, through the lens seam, both backends and the remote request."""

import json

import pytest
import torch

import lens_plugins as lp
from lens_plugins.core import readout
from lens_plugins.core import vocab_loss
from lens_plugins.core.readout import DecoderTensors
from lens_plugins.core.rows import Row
from lens_plugins.decoder import Decoder
from lens_plugins.methods.evaluate import evaluate_lenses
from lens_plugins.backends.hf import decoder_tensors, residual_stack, stack_rows
from lens_plugins.lenses.last_blocks import LastBlocksLens
from lens_plugins.training.tuned_lens import train_tuned_lens
from lens_plugins.lenses.tuned import TunedLens
from tiny_models import VOCAB, random_tokens, tiny_model


def decoder_of(hf) -> Decoder:
    return Decoder.of(decoder_tensors(hf))


def random_lens(d_model, n_layers, seed=0, scale=0.05):
    lens = TunedLens(d_model, n_layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return lens


def write_tuned_lens_checkpoint(path, d_model, n_layers, seed=0):
    """A checkpoint as tuned-lens writes one, by hand: its config keys plus one we do not know, and the
    ModuleList state dict of random translators."""
    path.mkdir()
    config = {"base_model_name_or_path": "tiny-llama", "d_model": d_model, "num_hidden_layers": n_layers,
              "bias": True, "base_model_revision": None, "unembed_hash": "abc", "lens_type": "linear_tuned_lens",
              "some_future_key": [1, 2]}
    (path / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(n_layers):
        state[f"{i}.weight"] = torch.randn(d_model, d_model, generator=generator) * 0.1
        state[f"{i}.bias"] = torch.randn(d_model, generator=generator) * 0.1
    torch.save(state, path / "params.pt")
    return state


# --- checkpoint format and decoding --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hand_written_checkpoint_decodes_as_the_formula_says(tmp_path, family):
    hf = tiny_model(family)
    d, n_layers = hf.config.hidden_size, hf.config.num_hidden_layers
    state = write_tuned_lens_checkpoint(tmp_path / "lens", d, n_layers)
    lens = TunedLens.load(tmp_path / "lens", hf)
    tokens = random_tokens(batch=1, seq=6)
    out = hf(tokens, output_hidden_states=True)
    norm = hf.model.norm if family == "llama" else hf.transformer.ln_f
    # Plain torch from HF hidden states: hidden state i (i < n_layers) is layer i's input.
    for i in range(n_layers):
        h = out.hidden_states[i][0]
        expected = (norm(h + h @ state[f"{i}.weight"].T + state[f"{i}.bias"]) @ hf.lm_head.weight.T).log_softmax(-1)
        stack = residual_stack(hf, tokens)[:, 0]
        ours = decoder_of(hf).logits(lens.transform(stack, stack_rows(n_layers))[i]).log_softmax(-1)
        assert (ours - expected).abs().max() <= 1e-5
    # The final hidden state is decoded as it is: the model's own log-probs.
    stack = residual_stack(hf, tokens)[:, 0]
    final = decoder_of(hf).logits(lens.transform(stack, stack_rows(n_layers))[-1]).log_softmax(-1)
    assert (final - out.logits[0].log_softmax(-1)).abs().max() <= 1e-5
    assert lens.config["some_future_key"] == [1, 2]  # unknown keys are kept ...
    lens.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["some_future_key"] == [1, 2]  # ... and written


def test_save_load_round_trips_bit_for_bit(tmp_path):
    lens = random_lens(64, 3)
    lens.save(tmp_path / "lens")
    state = torch.load(tmp_path / "lens" / "params.pt", weights_only=True)
    assert sorted(state) == sorted(f"{i}.{p}" for i in range(3) for p in ("weight", "bias"))  # tuned-lens's keys
    again = TunedLens.load(tmp_path / "lens")
    for a, b in zip(lens.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert again.config == lens.config


def test_zero_translators_are_exactly_the_logit_lens(smollm2_tokenizer):
    hf = tiny_model("llama")
    tokens = random_tokens(batch=1, seq=7)
    stack = residual_stack(hf, tokens)
    rows = stack_rows(hf.config.num_hidden_layers)
    lens = TunedLens.for_model(hf)
    flat = stack.reshape(len(rows), -1, stack.shape[-1])
    assert torch.equal(lens.transform(flat, rows), flat)
    labels = [row.label for row in rows]
    plain = lp.logit_lens_from_stack(stack, labels, decoder_of(hf), tokens, smollm2_tokenizer, top_k=3)
    tuned = lp.logit_lens_from_stack(lens.transform(flat, rows).reshape(stack.shape), labels, decoder_of(hf), tokens,
                                     smollm2_tokenizer, top_k=3)
    for name in ("top_ids", "top_logprobs", "entropy", "kl_final_row", "next_token_logprob"):
        torch.testing.assert_close(getattr(plain, name), getattr(tuned, name), atol=0, rtol=0, equal_nan=True)


def test_affine_is_the_transform_as_tensors():
    lens = random_lens(16, 4, seed=3)
    rows = [Row(0, "embed"), Row(2, "pre"), Row(1, "post"), Row(3, "mlp"), Row(3, "post")]
    resid = torch.randn(len(rows), 5, 16)
    weight, bias = lens.affine(rows, 16)
    by_formula = resid + torch.einsum("rtd,red->rte", resid, weight) + bias[:, None]
    torch.testing.assert_close(lens.transform(resid, rows), by_formula, atol=1e-6, rtol=0)
    for final in (3, 4):  # 3_mlp and 3_post are hidden state 4, the last block's output: decoded as it is
        assert torch.equal(weight[final], torch.zeros(16, 16)) and torch.equal(bias[final], torch.zeros(16))
    assert torch.equal(weight[1], weight[2]) and not torch.equal(weight[0], weight[1])  # 1_post is 2_pre


def test_bad_rows_models_and_checkpoints_are_refused_clearly(tmp_path):
    lens = TunedLens(64, 3)
    with pytest.raises(ValueError, match="'1_mid' is not one"):
        lens.transform(torch.zeros(1, 2, 64), [Row(1, "mid")])
    with pytest.raises(ValueError, match="'1_attn_out' is not one"):
        lens.affine([Row(1, "attn_out"), Row(2, "post")], 64)
    with pytest.raises(ValueError, match="width 32 .* d_model=64"):
        lens.transform(torch.zeros(1, 2, 32), [Row(0, "embed")])
    with pytest.raises(ValueError, match="hidden state 5, beyond"):
        lens.transform(torch.zeros(1, 2, 64), [Row(4, "post")])
    with pytest.raises(ValueError, match=r"made for another model \(unnamed: 2 layers\), but this model has 3 layers"):
        TunedLens(64, 2).check_model(tiny_model("llama"))
    write_tuned_lens_checkpoint(tmp_path / "wide", 32, 3)
    with pytest.raises(ValueError, match=r"\(tiny-llama: d_model=32\), but this model has d_model=64"):
        TunedLens.load(tmp_path / "wide", tiny_model("llama"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"d_model": 64, "num_hidden_layers": 4}))
    torch.save(TunedLens(64, 3).layer_translators.state_dict(), tmp_path / "broken" / "params.pt")
    with pytest.raises(ValueError, match="does not match its config"):
        TunedLens.load(tmp_path / "broken")
    with pytest.raises(FileNotFoundError, match="not a tuned-lens checkpoint"):
        TunedLens.load(tmp_path / "nowhere")  # a path: never sent to the hub


def test_train_on_the_class_trains_and_on_an_instance_sets_the_mode():
    lens = TunedLens(8, 2)
    assert lens.eval() is lens and not lens.training
    lens.train()
    assert lens.training
    assert "Train a tuned lens" in TunedLens.train.__doc__


# --- the tiled loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_tiled_loss_and_gradient_equal_the_materialised_ones(softcap, with_bias):
    generator = torch.Generator().manual_seed(0)
    d, vocab, n = 24, 1000, 45
    W_U = torch.randn(d, vocab, generator=generator) / d ** 0.5
    b_U = torch.randn(vocab, generator=generator) * 0.3 if with_bias else None
    normed = torch.randn(n, d, generator=generator).requires_grad_(True)
    ref = torch.randn(n, d, generator=generator)
    ids = torch.randint(0, vocab, (n,), generator=generator)
    weights = torch.rand(n, generator=generator)

    def logits(x):
        z = x @ W_U + (0 if b_U is None else b_U)
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    decoder = DecoderTensors("none", W_U, b_U=b_U, softcap=softcap)
    summary = vocab_loss.reference_summary(ref, decoder, vocab_chunk=128, token_chunk=16)
    tiled_kl = vocab_loss.kl_divergence(normed, summary, decoder, vocab_chunk=128, token_chunk=16)
    (grad_kl,) = torch.autograd.grad((tiled_kl * weights).sum(), normed)
    log_p, log_q = logits(ref).log_softmax(-1), logits(normed).log_softmax(-1)
    full_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    (full_grad_kl,) = torch.autograd.grad((full_kl * weights).sum(), normed)
    torch.testing.assert_close(tiled_kl, full_kl, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_kl, full_grad_kl, atol=1e-5, rtol=0)

    tiled_ce = vocab_loss.cross_entropy(normed, ids, decoder, vocab_chunk=128, token_chunk=16)
    (grad_ce,) = torch.autograd.grad((tiled_ce * weights).sum(), normed)
    full_ce = torch.nn.functional.cross_entropy(logits(normed), ids, reduction="none")
    (full_grad_ce,) = torch.autograd.grad((full_ce * weights).sum(), normed)
    torch.testing.assert_close(tiled_ce, full_ce, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_ce, full_grad_ce, atol=1e-5, rtol=0)

    kl, ce = vocab_loss.kl_and_cross_entropy(normed, summary, torch.cat([ids[:-1], torch.tensor([-1])]), decoder,
                                            vocab_chunk=128, token_chunk=16)
    torch.testing.assert_close(kl, full_kl.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ce[:-1], full_ce[:-1].detach(), atol=1e-5, rtol=0)
    assert torch.isnan(ce[-1])


def test_tiled_loss_refuses_bad_targets():
    decoder = DecoderTensors("none", torch.randn(8, 50))
    with pytest.raises(ValueError, match="target ids must lie in 0..49"):
        vocab_loss.cross_entropy(torch.randn(3, 8), torch.tensor([0, -1, 2]), decoder)
    summary = vocab_loss.reference_summary(torch.randn(4, 8), decoder)
    with pytest.raises(ValueError, match="summarises 4 tokens"):
        vocab_loss.kl_divergence(torch.randn(3, 8), summary, decoder)


# --- training ------------------------------------------------------------------------------------------------


def tiny_blocks(n=48, seq=16, seed=5):
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_training_lowers_heldout_kl_at_every_layer_and_a_seed_fixes_the_lens():
    hf = tiny_model("llama")
    with torch.no_grad():  # a random model's predictions are near uniform (KL ~0.01): sharpen them to give
        hf.lm_head.weight.mul_(4.0)  # the lens something to learn beyond noise
    blocks = tiny_blocks(n=256)
    kwargs = dict(steps=60, batch_size=16, heldout=0.25, seed=1, vocab_chunk=256)
    lens = train_tuned_lens(hf, blocks, **kwargs)
    again = train_tuned_lens(hf, blocks, **kwargs)
    for a, b in zip(lens.parameters(), again.parameters()):
        assert torch.equal(a, b)
    result = evaluate_lenses(hf, lens.heldout_blocks, [TunedLens.for_model(hf), lens], names=["logit", "tuned"])
    kl = result.table("kl")
    assert (kl["tuned"].iloc[:-1] < kl["logit"].iloc[:-1]).all(), kl
    assert kl["logit"].iloc[-1] == pytest.approx(0, abs=1e-5) and kl["tuned"].iloc[-1] == pytest.approx(0, abs=1e-5)
    assert len(lens.history) == 60 and set(lens.history[0]) >= {"step", "loss", "lr", "embed", "1_pre", "2_pre"}


def test_a_resumed_run_gives_the_uninterrupted_lens(tmp_path, monkeypatch):
    from lens_plugins.training import tuned_lens as train_lens

    hf = tiny_model("llama")
    blocks = tiny_blocks(n=20)
    kwargs = dict(steps=6, batch_size=2, seed=2, vocab_chunk=256, checkpoint_every=2)
    straight = train_tuned_lens(hf, blocks, **kwargs)
    real = train_lens.tuned_lens_losses
    calls = []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(train_lens, "tuned_lens_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_tuned_lens(hf, blocks, checkpoint=str(tmp_path), **kwargs)
    monkeypatch.setattr(train_lens, "tuned_lens_losses", real)
    resumed = train_tuned_lens(hf, blocks, checkpoint=str(tmp_path), **kwargs)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert [e["loss"] for e in resumed.history] == [e["loss"] for e in straight.history]
    with pytest.raises(ValueError, match="another configuration"):
        train_tuned_lens(hf, blocks, checkpoint=str(tmp_path), **{**kwargs, "seed": 3})


def test_cross_entropy_training_and_the_shortcut_start():
    hf = tiny_model("llama")
    blocks = tiny_blocks()
    lens = train_tuned_lens(hf, blocks, steps=3, batch_size=4, loss="ce", init="shortcut", vocab_chunk=256)
    assert any(n > 0 for n in lens.translator_norms())
    with pytest.raises(ValueError, match="loss must be 'kl'"):
        train_tuned_lens(hf, blocks, loss="mse")


def test_text_sources(tmp_path, smollm2_tokenizer):
    from lens_plugins.training import loop as train

    (tmp_path / "a.txt").write_text("First document.\n\nSecond one.\n\n\n")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "bad.jsonl").write_text('{"body": "one"}\n')
    assert train.load_texts(tmp_path / "a.txt") == ["First document.", "Second one."]
    assert train.load_texts(str(tmp_path / "a.jsonl")) == ["one", "two"]
    assert len(train.load_texts(None)) > 50  # the built-in corpus
    with pytest.raises(ValueError, match=r"bad.jsonl:1 has no string field 'text'"):
        train.load_texts(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="wrap a single text in a list"):
        train.load_texts("just some text")
    blocks = train.token_blocks(train.load_texts(None)[:5], smollm2_tokenizer, 64)
    assert blocks.shape[1] == 64 and blocks.dtype == torch.long
    kept, held = train.split_heldout(blocks, 0.2, seed=0)
    assert len(kept) + len(held) == len(blocks) and len(held) == round(0.2 * len(blocks))
    assert not any(torch.equal(h, k) for h in held for k in kept)


# --- evaluation and the variant decoder ---------------------------------------------------------------------


def test_evaluation_agrees_with_the_streamed_readout(smollm2_tokenizer):
    hf = tiny_model("gemma2")  # soft-capped: the KL path that rebuilds p tile by tile
    blocks = tiny_blocks(n=2, seq=9)
    lens = random_lens(hf.config.hidden_size, hf.config.num_hidden_layers, scale=0.02)
    result = evaluate_lenses(hf, blocks, [TunedLens.for_model(hf), lens], names=["logit", "tuned"])
    frame = result.to_dataframe()
    assert list(frame.columns) == ["lens", "row", "kl", "cross_entropy", "perplexity"] and len(frame) == 2 * 4
    rows = stack_rows(hf.config.num_hidden_layers)
    for name, chosen in (("logit", TunedLens.for_model(hf)), ("tuned", lens)):
        kl, ce = [], []
        for block in blocks:
            stack = residual_stack(hf, block[None])
            flat = chosen.transform(stack.reshape(len(rows), -1, stack.shape[-1]), rows).reshape(stack.shape)
            res = lp.logit_lens_from_stack(flat, [r.label for r in rows], decoder_of(hf), block[None], smollm2_tokenizer)
            kl.append(res.kl_final_row[:, 0])
            ce.append(-res.next_token_logprob[:, 0, :-1])
        index = result.lens_names.index(name)
        torch.testing.assert_close(result.kl[index], torch.cat(kl, -1).mean(-1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(result.cross_entropy[index], torch.cat(ce, -1).mean(-1), atol=1e-4, rtol=1e-4)
        assert list(result.table("kl")[name]) == result.kl[index].tolist()
    figure = result.plot("perplexity")
    assert [trace.name for trace in figure.data] == ["logit", "tuned"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "opt"])
def test_last_blocks_decoder_reproduces_the_model(family):
    hf = tiny_model(family)
    tokens = random_tokens(batch=1, seq=8)
    n_layers = hf.config.num_hidden_layers
    stack = residual_stack(hf, tokens)[:, 0].float()
    rows = stack_rows(n_layers)
    model_logprobs = hf(tokens).logits[0].log_softmax(-1)
    last_block = LastBlocksLens(hf, k=1).transform(stack, rows)
    decoded = decoder_of(hf).logits(last_block[-2]).log_softmax(-1)  # row {L-1}_pre through the last block
    assert (decoded - model_logprobs).abs().max() <= 1e-5
    every_block = LastBlocksLens(hf, k=n_layers).transform(stack, rows)  # every row through the rest of the model
    assert (decoder_of(hf).logits(every_block).log_softmax(-1) - model_logprobs).abs().max() <= 1e-5
    logit_lens = decoder_of(hf).logits(stack[0]).log_softmax(-1)
    assert (logit_lens - model_logprobs).abs().max() > 1e-2  # the test could fail: row 0 alone is not the model
    with pytest.raises(ValueError, match="k must lie in 1..3"):
        LastBlocksLens(hf, k=4)


# --- both backends and remote, through the lens seam (`lens=` on every entry point) ---------------------------


@pytest.fixture(scope="module")
def tiny_tuned():
    hf = tiny_model("llama")
    return random_lens(hf.config.hidden_size, hf.config.num_hidden_layers, seed=7, scale=0.05)


def expected_from_stack(hf, tokens, lens, tokenizer):
    stack = residual_stack(hf, tokens)
    rows = stack_rows(hf.config.num_hidden_layers)
    flat = lens.transform(stack.reshape(len(rows), -1, stack.shape[-1]), rows).reshape(stack.shape)
    return lp.logit_lens_from_stack(flat, [r.label for r in rows], decoder_of(hf), tokens, tokenizer, top_k=3)


def test_seam_transformer_lens_cache_with_a_tuned_lens(tiny_tuned, smollm2_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"), tokenizer=smollm2_tokenizer)
    bridge.eval()
    tokens = random_tokens(batch=1, seq=6)
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge))
    ours = cache.lens.logit_lens(tokens=tokens, top_k=3, lens=tiny_tuned)
    expected = expected_from_stack(tiny_model("llama"), tokens, tiny_tuned, smollm2_tokenizer)
    torch.testing.assert_close(ours.top_logprobs, expected.top_logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.kl_final_row, expected.kl_final_row, atol=1e-4, rtol=0)


def test_seam_nnsight_trace_with_a_tuned_lens_and_its_request_size(tiny_tuned, smollm2_tokenizer):
    from nnsight.schema.request import RequestModel

    from lens_plugins.backends import nnsight as lpn
    from lens_plugins.backends.nnsight import logit_lens

    model = lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)
    tokens = random_tokens(batch=1, seq=6)
    with model.trace(tokens):
        saved = logit_lens(model, top_k=3, lens=tiny_tuned)
    ours = lpn.logit_lens_result(saved, model)
    expected = expected_from_stack(tiny_model("llama"), tokens, tiny_tuned, smollm2_tokenizer)
    torch.testing.assert_close(ours.top_logprobs, expected.top_logprobs, atol=1e-4, rtol=0)

    from nnsight.tracing.backend import Backend

    class Keep(Backend):  # keep the request blob a remote backend would send, then run here
        def __call__(self, tracer):
            self.blob = RequestModel.serialize(tracer)
            tracer.execute(tracer.info.code)

    plain, tuned = Keep(), Keep()
    with model.trace(tokens, backend=plain):
        logit_lens(model, top_k=3)
    with model.trace(tokens, backend=tuned):
        logit_lens(model, top_k=3, lens=tiny_tuned)
    translators = sum(p.numel() for p in tiny_tuned.parameters()) * 4  # bytes of the 3 translators
    extra = len(tuned.blob) - len(plain.blob)
    assert translators <= extra <= 2 * translators + 100_000, (extra, translators)  # they travel, little else


def test_public_names():
    assert lp.TunedLens is TunedLens
    assert lp.evaluate_lenses is evaluate_lenses
    assert lp.LastBlocksLens is LastBlocksLens


# --- big lenses: download the rows, decode on the client with a decoder read alone from safetensors ----------


@pytest.mark.parametrize("family,shard", [("llama", False), ("gemma2", True), ("opt", False), ("gpt2", True)])
def test_decoder_read_alone_from_safetensors_equals_the_models(tmp_path, family, shard):
    from lens_plugins.models.checkpoint import decoder_from_checkpoint

    hf = tiny_model(family)
    hf.save_pretrained(tmp_path, max_shard_size="200KB" if shard else "2GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    ours = decoder_from_checkpoint(tmp_path)
    resid = torch.randn(2, 5, hf.config.hidden_size)
    torch.testing.assert_close(ours.logits(resid), decoder_of(hf).logits(resid), atol=1e-5, rtol=0)


def test_rows_downloaded_from_a_trace_decode_on_the_client(tmp_path, tiny_tuned, smollm2_tokenizer):
    from lens_plugins.backends import nnsight as lpn
    from lens_plugins.models.checkpoint import decode_rows, decoder_from_checkpoint

    hf = tiny_model("llama")
    hf.save_pretrained(tmp_path)
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    tokens = random_tokens(batch=1, seq=6)
    layers = model.model.layers
    saved = []
    with model.trace(tokens):  # what a remote trace would download: the residual rows, nothing decoded
        for i in range(3):
            saved.append(layers[i].inputs[0][0].save())
        saved.append(layers[2].output.save())
    stack = torch.stack([s if isinstance(s, torch.Tensor) else s[0] for s in saved])
    labels = [r.label for r in stack_rows(3)]
    ours = decode_rows(stack, labels, tiny_tuned, decoder_from_checkpoint(tmp_path), tokens, smollm2_tokenizer, top_k=3)
    expected = expected_from_stack(tiny_model("llama"), tokens, tiny_tuned, smollm2_tokenizer)
    torch.testing.assert_close(ours.top_logprobs, expected.top_logprobs, atol=1e-5, rtol=0)
    assert torch.equal(ours.top_ids, expected.top_ids)


# --- the command line ----------------------------------------------------------------------------------------


def test_train_lens_command_saves_a_loadable_lens_and_reports_heldout_kl(tmp_path, smollm2_tokenizer, capsys):
    import transformers

    from lens_plugins.cli import main as cli

    config = transformers.LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    smollm2_tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text("\n\n".join(["The quick brown fox jumps over the lazy dog."] * 40))
    status = cli.main(["train-lens", "--model", str(tmp_path / "model"), "--text", str(tmp_path / "text.txt"),
                       "--out", str(tmp_path / "lens"), "--steps", "2", "--seq-len", "16", "--eval-blocks", "1",
                       "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0, out
    lens = TunedLens.load(tmp_path / "lens")
    assert (lens.d_model, lens.num_hidden_layers) == (32, 2) and lens.config["base_model_name_or_path"] == "model"
    assert "held-out KL" in out and "1_post" in out
    assert (tmp_path / "lens" / "heldout_eval.csv").exists()
    assert cli.main(["train-lens", "--out", str(tmp_path / "x"), "--text", str(tmp_path / "missing.txt")]) == 1
    assert "no text file at" in capsys.readouterr().err
