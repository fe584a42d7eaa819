"""Lenses trained for mid-block rows (issue 29, item 3): tuned-lens translators and Jacobian-lens matrices for
``{l}_mid``, the residual between block ``l``'s attention and MLP.

What is asserted, and why it can fail:
- both backends (TransformerLens bridge cache, nnsight trace, and the serialised ``remote="local"`` request)
  decode the mid rows through each lens to the same numbers as an independent path: the Hugging Face reader's
  rows, mapped by the lens by hand and read by ``logit_lens_from_stack``;
- zero mid translators are exactly the logit lens on mid rows (``torch.equal``), and so is an identity ``J_mid``;
- the tuned-lens file keeps tuned-lens's layout: a plain-layout reader written as tuned-lens's own loader is
  (unknown config keys dropped, ``params.pt`` loaded strictly) loads the ordinary rows bit for bit, and
  TransformerLens 4.3's ``JacobianLens.load`` loads our Jacobian file's ordinary layers;
- ``J_mid[l]`` of one prompt equals ``torch.autograd.functional.jacobian`` of the definition (``h_final`` as
  a function of ``h_mid,l``, the rest of the forward run by hand from the block's modules), on both backends;
- a trained mid lens lowers held-out KL on every mid row below the logit lens's.
"""

import json

import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends.hf import decoder_tensors, residual_rows
from lens_plugins.core.errors import LensFileNotFoundError, LensValueError
from lens_plugins.core.rows import plan
from lens_plugins.decoder import Decoder
from lens_plugins.lenses.jacobian import JacobianLens
from lens_plugins.lenses.tuned import MID_PARAMS_FILE, TunedLens
from lens_plugins.methods.evaluate import evaluate_lenses
from tiny_models import VOCAB, random_tokens, tiny_model

N_LAYERS, D = 3, 64
SKIP = 2


def random_tuned(seed=0, scale=0.05, resid_mid=True):
    lens = TunedLens(D, N_LAYERS, resid_mid=resid_mid, base_model_name_or_path="tiny-llama")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return lens


def random_jacobian(seed=0, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    mats = lambda layers: {l: torch.eye(D) + torch.randn(D, D, generator=generator) * scale for l in layers}  # noqa: E731
    return JacobianLens(mats(range(N_LAYERS - 1)), n_prompts=1, d_model=D, mid_jacobians=mats(range(N_LAYERS)))


@pytest.fixture(scope="module")
def bridge(smollm2_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"),
                                               tokenizer=smollm2_tokenizer).eval()


@pytest.fixture(scope="module")
def nn_model(smollm2_tokenizer):
    return lp.nnsight.wrap_model(tiny_model("llama"), smollm2_tokenizer)


def ids(tokens):
    """Token ids as a prompt mapping (what ``run_logit_lens`` takes besides text)."""
    return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}


def expected(tokens, lens, tokenizer):
    """The independent path: the HF reader's rows (mid included), the lens's own transform, the stack readout."""
    hf = tiny_model("llama")
    rows = plan(N_LAYERS, resid_mid=True)
    stack = residual_rows(hf, tokens, rows).float()
    flat = stack.reshape(len(rows), -1, D)
    picked = [r for r, row in enumerate(rows) if row.site != "embed"]
    mapped = stack.clone()
    mapped[picked] = lens.transform(flat[picked], [rows[r] for r in picked]).reshape(stack[picked].shape)
    return lp.logit_lens_from_stack(mapped, [r.label for r in rows], Decoder.of(decoder_tensors(hf)), tokens,
                                    tokenizer, top_k=3)


MID_AND_AFTER = ["0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "2_post"]


@pytest.mark.parametrize("make", [random_tuned, random_jacobian], ids=["tuned", "jacobian"])
def test_both_backends_and_the_remote_request_decode_mid_rows_through_the_lens(make, bridge, nn_model,
                                                                                smollm2_tokenizer):
    lens = make()
    tokens = random_tokens(batch=1, seq=8)
    reference = expected(tokens, lens, smollm2_tokenizer)
    index = [reference.labels.index(label) for label in MID_AND_AFTER]
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge, resid_mid=True))
    on_tl = cache.lens.logit_lens(tokens=tokens, top_k=3, lens=lens, resid_mid=True, layers=MID_AND_AFTER)
    on_nn = lp.nnsight.run_logit_lens(nn_model, ids(tokens), lens=lens, resid_mid=True, layers=MID_AND_AFTER,
                                      top_k=3)
    remote = lp.nnsight.run_logit_lens(nn_model, ids(tokens), lens=lens, resid_mid=True, layers=MID_AND_AFTER,
                                       top_k=3, remote="local")
    for result in (on_tl, on_nn, remote):
        assert result.labels == MID_AND_AFTER
        assert torch.equal(result.top_ids, reference.top_ids[index])
        torch.testing.assert_close(result.top_logprobs, reference.top_logprobs[index], atol=1e-4, rtol=0)
        torch.testing.assert_close(result.kl_final_row, reference.kl_final_row[index], atol=1e-4, rtol=0)
    # the lens did something on the mid rows: they differ from the logit lens's
    plain = lp.nnsight.run_logit_lens(nn_model, ids(tokens), resid_mid=True, layers=MID_AND_AFTER, top_k=3)
    assert (plain.top_logprobs[[0, 2, 4]] - on_nn.top_logprobs[[0, 2, 4]]).abs().max() > 1e-2


def test_zero_mid_translators_and_identity_mid_matrices_are_exactly_the_logit_lens(bridge, nn_model):
    tokens = random_tokens(batch=1, seq=8)
    zero = random_tuned()
    with torch.no_grad():
        for translator in zero.mid_translators:
            translator.weight.zero_()
            translator.bias.zero_()
    eye = JacobianLens({0: torch.eye(D)}, n_prompts=1, d_model=D,
                       mid_jacobians={l: torch.eye(D) for l in range(N_LAYERS)})
    mids = ["0_mid", "1_mid", "2_mid"]
    _, cache = bridge.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(bridge, resid_mid=True))
    for run in (lambda **kw: lp.nnsight.run_logit_lens(nn_model, ids(tokens), resid_mid=True, layers=mids, **kw),
                lambda **kw: cache.lens.logit_lens(tokens=tokens, resid_mid=True, layers=mids, **kw)):
        plain = run()
        for lens in (zero, eye):
            lensed = run(lens=lens)
            assert torch.equal(lensed.top_ids, plain.top_ids)
            assert torch.equal(lensed.top_logprobs, plain.top_logprobs)
            assert torch.equal(lensed.kl_final_row, plain.kl_final_row)


def plain_layout_load(path):
    """tuned-lens 0.2's own loader, as its source reads (``TunedLensConfig.from_dict`` drops the config keys it
    does not know; ``layer_translators.load_state_dict(torch.load(params.pt))`` is strict)."""
    known = ("base_model_name_or_path", "d_model", "num_hidden_layers", "bias", "base_model_revision",
             "unembed_hash", "lens_type")
    config = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k in known}
    translators = torch.nn.ModuleList(torch.nn.Linear(config["d_model"], config["d_model"], bias=config["bias"])
                                      for _ in range(config["num_hidden_layers"]))
    translators.load_state_dict(torch.load(path / "params.pt", weights_only=True))
    return translators


def test_tuned_files_keep_tuned_lens_layout_and_round_trip(tmp_path):
    lens = random_tuned(seed=3)
    lens.save(tmp_path / "mid")
    assert sorted(p.name for p in (tmp_path / "mid").iterdir()) == ["config.json", MID_PARAMS_FILE, "params.pt"]
    assert json.loads((tmp_path / "mid" / "config.json").read_text())["resid_mid"] is True
    ordinary = plain_layout_load(tmp_path / "mid")
    for theirs, ours in zip(ordinary, lens.layer_translators):
        assert torch.equal(theirs.weight, ours.weight) and torch.equal(theirs.bias, ours.bias)
    loaded = TunedLens.load(tmp_path / "mid")
    assert loaded.resid_mid
    for a, b in zip(loaded.state_dict().values(), lens.state_dict().values()):
        assert torch.equal(a, b)
    # a lens without mid translators writes exactly tuned-lens's two files and no resid_mid key
    plain = random_tuned(seed=4, resid_mid=False)
    plain.save(tmp_path / "plain")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["config.json", "params.pt"]
    assert "resid_mid" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not TunedLens.load(tmp_path / "plain").resid_mid
    (tmp_path / "mid" / MID_PARAMS_FILE).unlink()
    with pytest.raises(LensFileNotFoundError, match="mid_params.pt"):
        TunedLens.load(tmp_path / "mid")


def test_a_lens_without_mid_translators_still_refuses_mid_rows_and_says_how(nn_model):
    with pytest.raises(LensValueError, match="no mid-block translators.*resid_mid=True"):
        lp.nnsight.run_logit_lens(nn_model, ids(random_tokens(batch=1, seq=6)), lens=random_tuned(resid_mid=False),
                                  resid_mid=True, layers=["0_mid"])


def test_transformer_lens_loads_our_jacobian_file_and_we_load_its_files(tmp_path):
    reference = pytest.importorskip("transformer_lens.tools.analysis.jacobian_lens")
    lens = random_jacobian(seed=5)
    path = lens.save(tmp_path / "mid.pt")
    theirs = reference.JacobianLens.load(str(path))
    assert theirs.source_layers == lens.source_layers
    for layer in lens.source_layers:
        assert torch.equal(theirs.jacobians[layer], lens.jacobians[layer].half().float())
    ours = JacobianLens.load(path)
    assert ours.mid_layers == [0, 1, 2]
    for layer in ours.mid_layers:
        assert torch.equal(ours.mid_jacobians[layer], lens.mid_jacobians[layer].half().float())
    merged = JacobianLens.merge([ours, ours])
    assert torch.equal(merged.mid_jacobians[1], ours.mid_jacobians[1])


def mid_to_final(hf, tokens, layer):
    """``h_final`` as a function of block ``layer``'s mid residual, the rest of the forward written out from the
    model's own modules (Llama: mid -> + MLP(post_attention_layernorm(mid)) -> later blocks)."""
    model = hf.model
    with torch.no_grad():
        mid = residual_rows(hf, tokens, [lp.Row(layer, "mid")])[0]
    seq = tokens.shape[1]
    position_ids = torch.arange(seq)[None]
    embeddings = model.rotary_emb(mid, position_ids)
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]

    def forward(h):
        block = model.layers[layer]
        h = h + block.mlp(block.post_attention_layernorm(h))
        for later in model.layers[layer + 1:]:
            h = later(h, attention_mask=mask, position_ids=position_ids, position_embeddings=embeddings)
            h = h[0] if isinstance(h, tuple) else h
        return h

    return mid, forward


def test_mid_matrix_of_one_prompt_equals_autograd_jacobian_of_the_definition(bridge, nn_model, smollm2_tokenizer):
    hf = tiny_model("llama")
    tokens = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(7))
    fitted = {name: JacobianLens.fit(model, tokens, skip_first=SKIP, mid_layers=range(N_LAYERS), progress=False,
                                     max_prompts=None)
              for name, model in (("nnsight", nn_model), ("bridge", bridge))}
    positions = list(range(SKIP, tokens.shape[1] - 1))
    prompt = tokens[:, :-1]  # the fit drops the last token: nothing before it depends on it
    for layer in range(N_LAYERS):
        mid, forward = mid_to_final(hf, prompt, layer)
        with torch.no_grad():  # the hand-written forward is the model's forward
            torch.testing.assert_close(forward(mid), residual_rows(hf, prompt, [lp.Row(N_LAYERS - 1, "post")])[0],
                                       atol=1e-5, rtol=0)
        full = torch.autograd.functional.jacobian(forward, mid)  # [1, seq, d, 1, seq, d]
        # J = (1/|V|) sum_{t in V} sum_{t' in V} d h_final,t' / d h_mid,t
        expected = full[0][positions][:, :, 0][:, :, positions].sum(0).mean(1)
        for name, lens in fitted.items():
            torch.testing.assert_close(lens.mid_jacobians[layer], expected, atol=2e-5, rtol=1e-4,
                                       msg=f"{name}, block {layer}")
    for layer in fitted["nnsight"].source_layers:  # the block-output matrices are unchanged by the mid points
        alone = JacobianLens.fit(nn_model, tokens, skip_first=SKIP, progress=False, max_prompts=None)
        torch.testing.assert_close(fitted["nnsight"].jacobians[layer], alone.jacobians[layer], atol=1e-6, rtol=0)


def test_fit_checkpoint_resumes_mid_matrices_and_refuses_other_mid_layers(nn_model, tmp_path):
    tokens = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(8))
    whole = JacobianLens.fit(nn_model, tokens, skip_first=SKIP, mid_layers=[1], progress=False, max_prompts=None)
    path = tmp_path / "fit.pt"
    JacobianLens.fit(nn_model, tokens, skip_first=SKIP, mid_layers=[1], progress=False, max_prompts=2,
                     checkpoint=path)
    resumed = JacobianLens.fit(nn_model, tokens, skip_first=SKIP, mid_layers=[1], progress=False, max_prompts=None,
                               checkpoint=path)
    assert torch.equal(resumed.mid_jacobians[1], whole.mid_jacobians[1])
    assert JacobianLens.load(path).mid_layers == [1]
    with pytest.raises(LensValueError, match="mid_layers"):
        JacobianLens.fit(nn_model, tokens, skip_first=SKIP, mid_layers=[0], progress=False, checkpoint=path)
    with pytest.raises(LensValueError, match="remote"):
        JacobianLens.fit(nn_model, tokens, skip_first=SKIP, mid_layers=[0], progress=False, remote="local")


def test_trained_mid_lens_lowers_heldout_kl_on_every_mid_row():
    hf = tiny_model("llama")
    blocks = torch.randint(3, VOCAB, (24, 16), generator=torch.Generator().manual_seed(9))
    lens = TunedLens.train(hf, blocks, steps=30, resid_mid=True, seed=0, lr=1.0, heldout=0.25)
    assert lens.resid_mid and {"0_mid", "1_mid", "2_mid", "embed", "1_pre"} <= set(lens.history[-1])
    scores = evaluate_lenses(hf, lens.heldout_blocks, [lp.LogitLens(), lens], names=["logit", "tuned"],
                             resid_mid=True)
    table = scores.table("kl")
    for label in ("0_mid", "1_mid", "2_mid"):
        assert table.loc[label, "tuned"] < 0.8 * table.loc[label, "logit"], table
    picked = evaluate_lenses(hf, lens.heldout_blocks, [lp.LogitLens(), lens], names=["logit", "tuned"],
                             resid_mid=True, layers=["1_mid", "2_pre"])
    assert picked.row_labels == ["1_mid", "2_pre", "2_post"]  # layers= selects rows; the last is always kept
    torch.testing.assert_close(picked.kl, scores.kl[:, [3, 4, 6]], atol=1e-6, rtol=0)
    # a lens trained without mid translators still trains and scores NaN on the mid rows (not another lens's)
    plain = TunedLens.train(hf, blocks, steps=2, seed=0, heldout=0.25)
    scores = evaluate_lenses(hf, plain.heldout_blocks, [plain], resid_mid=True)
    assert scores.table("kl").loc["1_mid"].isna().all() and not scores.table("kl").loc["1_pre"].isna().any()
    with pytest.raises(LensValueError, match="has none"):
        TunedLens.train(hf, blocks, steps=1, lens=plain, resid_mid=True)
