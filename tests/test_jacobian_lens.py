"""The Jacobian lens against TransformerLens 4.3's ``tools.analysis.jacobian_lens`` (the reference), on both
backends: the fitted matrices, the readout, the file format both ways, merge, resumable checkpoints, the
interventions, and the refusals.

Why the matrices agree to float32 rounding: both fits take the same vector-Jacobian products (TransformerLens
replicates the forward ``dim_batch`` times, this package batches the cotangents with ``is_grads_batched`` and
builds its graph over the estimator's positions only: the skipped prefix through the model's key/value cache,
the last token dropped), and each row is the same ``mean`` over the same positions. The backward's sums may run
in another order (other shapes), so the bound is derived, not fitted: each
entry of J is a sum of products through ``k`` blocks of float32 matmuls with inner sizes ``m`` up to
``d_ff``; reordering one such sum changes it by at most ``~m * eps * sum|terms|``; over ``k`` blocks and
``|terms| <= max|J|``, ``|dJ| <= k * m * eps * max|J|``. For three SmolLM2 blocks (``k = 3``, ``m = 1536``,
``eps = 6e-8``) that is 2.8e-4 * max|J|, which the SmolLM2 test asserts. Readouts: on the tiny model the
log-probs agree within 1e-5; on SmolLM2 both this package's and TransformerLens's float32 readouts are ~1.2e-5 from
a float64 one, so they are compared within twice the float32 bound ``sqrt(d_model) * eps * |log Z|``.
"""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

import lens_plugins as lp
from lens_plugins.core.errors import LensError, LensValueError
from lens_plugins.lenses.jacobian import JacobianLens

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import VOCAB, tiny_model  # noqa: E402

reference = pytest.importorskip("transformer_lens.tools.analysis.jacobian_lens")
SKIP = 4


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lens_plugins.models import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def texts(tokenizer):
    """Three texts whose tokens all lie in the tiny models' 1000-id vocabulary, 14-22 tokens long."""
    generator = torch.Generator().manual_seed(0)
    found = []
    while len(found) < 3:
        text = tokenizer.decode(torch.randint(3, VOCAB, (20,), generator=generator))
        ids = tokenizer(text)["input_ids"]
        if max(ids) < VOCAB and 14 <= len(ids) <= 22:
            found.append(text)
    return found


@pytest.fixture(scope="module")
def bridge(tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"), tokenizer=tokenizer).eval()


@pytest.fixture(scope="module")
def nn_model(tokenizer):
    return lp.nnsight.wrap_model(tiny_model("llama"), tokenizer)


@pytest.fixture(scope="module")
def tl_lens(bridge, texts):
    return reference.JacobianLens.fit(bridge, texts, corpus="test", skip_first_positions=SKIP, show_progress=False)


@pytest.fixture(scope="module")
def lens_tl(bridge, texts):
    return JacobianLens.fit(bridge, texts, skip_first=SKIP, prepend_bos=True, progress=False)


@pytest.fixture(scope="module")
def lens_nn(nn_model, texts):
    return JacobianLens.fit(nn_model, texts, skip_first=SKIP, prepend_bos=True, progress=False, chunk=5)


def test_fit_equals_transformer_lens_on_both_backends(tl_lens, lens_tl, lens_nn):
    assert tl_lens.source_layers == lens_tl.source_layers == lens_nn.source_layers == [0, 1]
    assert tl_lens.n_prompts == lens_tl.n_prompts == lens_nn.n_prompts == 3
    for layer in tl_lens.source_layers:
        expected = tl_lens.jacobians[layer]
        assert not torch.allclose(expected, torch.eye(64), atol=1e-2)  # a real map, not the identity
        # the same VJPs and means, over a graph of other shapes (the prefix read through the cache, the last
        # token dropped): within the derived bound k * m * eps * max|J| (module docstring), k = 2 blocks, m = 128
        bound = 2 * 128 * torch.finfo(torch.float32).eps * float(expected.abs().max())
        for mine in (lens_tl, lens_nn):
            assert float((mine.jacobians[layer] - expected).abs().max()) <= bound


def test_the_fit_reads_the_prefix_through_the_cache_and_that_changes_nothing(monkeypatch, bridge, nn_model, texts,
                                                                             tokenizer, lens_nn):
    """On a Hugging Face / nnsight model the graph covers only the estimator's positions (the check on the first
    prompt passes, so the cached prefix is used); a fit without the cache gives the same matrices within the
    derived bound; a reader whose cached forward is off is caught by the check. A TransformerBridge's cache stays
    empty (TransformerLens 4.3 under transformers 5), which the same check would catch, so it is not used there."""
    import lens_plugins.training.jacobian_lens as fit

    ids = tokenizer(texts[0])["input_ids"]
    read, caches = fit._reader(nn_model)[:2]
    assert caches and fit._cache_agrees(read, ids, 2, SKIP)
    with torch.no_grad():
        suffix = read(torch.tensor([ids[:-1]]), [0, 2], SKIP)
        full = read(torch.tensor([ids]), [0, 2], 0)
    assert [h.shape[1] for h in suffix] == [len(ids) - 1 - SKIP] * 2  # the prefix and the last token: gone
    torch.testing.assert_close(suffix[1], full[1][:, SKIP:-1], rtol=0, atol=1e-5)

    def shifted(tokens, layers, prefix):
        return [h + 1e-2 * h.abs().max() if prefix else h for h in read(tokens, layers, prefix)]

    assert not fit._cache_agrees(shifted, ids, 2, SKIP)
    read_tl, caches_tl = fit._reader(bridge)[:2]
    assert not caches_tl

    def through_bridge_cache(tokens, layers, prefix):  # what a cached bridge read gives today: an empty cache
        return read_tl(tokens[:, prefix:], layers, 0)

    assert not fit._cache_agrees(through_bridge_cache, ids, 2, SKIP)
    monkeypatch.setattr(fit, "_cache_agrees", lambda *args: False)
    without = JacobianLens.fit(nn_model, texts, skip_first=SKIP, prepend_bos=True, progress=False, chunk=5)
    for layer in (0, 1):
        bound = 2 * 128 * torch.finfo(torch.float32).eps * float(without.jacobians[layer].abs().max())
        assert float((lens_nn.jacobians[layer] - without.jacobians[layer]).abs().max()) <= bound


def test_one_jacobian_row_is_the_definition(nn_model, texts, tokenizer):
    """Row i of one prompt's matrix, rebuilt from the definition with torch.autograd.functional.jacobian: the
    sum over targets t' >= t in V of d h_final,t'[i] / d h_l,t, averaged over sources t in V."""
    from lens_plugins.backends._common import prompt_ids

    hf = nn_model._module
    ids = torch.tensor([prompt_ids(tokenizer, texts[0], True)])
    lens = JacobianLens.fit(nn_model, ids, skip_first=SKIP, progress=False, source_layers=[1])
    with torch.no_grad():
        h1 = _block_output(hf, ids, 1).detach()

    def final_from_h1(x):  # the last block's output with block 1's output replaced by x
        handle = hf.model.layers[1].register_forward_hook(lambda module, args, output: x)
        try:
            return _block_output(hf, ids, 2)
        finally:
            handle.remove()

    full = torch.autograd.functional.jacobian(final_from_h1, h1)  # [1, seq, d, 1, seq, d]
    seq = ids.shape[1]
    V = list(range(SKIP, seq - 1))
    J = torch.zeros(64, 64)
    for t in V:
        for t2 in V:
            if t2 >= t:
                J += full[0, t2, :, 0, t, :]
    J /= len(V)
    torch.testing.assert_close(lens.jacobians[1], J, rtol=0, atol=1e-5)


def _block_output(hf, ids, layer):
    out = {}
    handle = hf.model.layers[layer].register_forward_hook(lambda m, a, o: out.setdefault("h", o))
    try:
        hf.model(ids)
    finally:
        handle.remove()
    return out["h"]


def test_readout_equals_transformer_lens(bridge, nn_model, tl_lens, lens_tl, texts):
    """Top-k ids equal and log-probs within 1e-5 of the reference's readout, on both backends."""
    text = texts[0]
    ref = tl_lens.readout(bridge, text, top_k=5, return_full_logits=True)
    ours = lp.transformer_lens.run_logit_lens(bridge, text, lens=lens_tl, layers=range(1, 4), top_k=5,
                                              prepend_bos=True)
    theirs = lp.nnsight.run_logit_lens(nn_model, text, lens=lens_tl, layers=range(1, 4), top_k=5, prepend_bos=True)
    assert ours.labels == ["1_pre", "2_pre", "2_post"]  # block 0's output, block 1's, the final one
    for r, layer in enumerate([0, 1, 2]):
        logprobs = torch.log_softmax(ref.lens_logits[layer].float(), dim=-1)
        top = logprobs.topk(5, dim=-1)
        assert torch.equal(ours.top_ids[r, 0], top.indices)
        torch.testing.assert_close(ours.top_logprobs[r, 0], top.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.top_logprobs, theirs.top_logprobs, rtol=0, atol=1e-5)
    assert torch.equal(ours.top_ids, theirs.top_ids)


def test_identity_is_the_logit_lens_and_the_last_row_is_the_model(bridge, texts):
    eye = JacobianLens({0: torch.eye(64), 1: torch.eye(64)}, n_prompts=1, d_model=64)
    plain = lp.transformer_lens.run_logit_lens(bridge, texts[1], layers=range(1, 4))
    lensed = lp.transformer_lens.run_logit_lens(bridge, texts[1], lens=eye, layers=range(1, 4))
    torch.testing.assert_close(lensed.top_logprobs, plain.top_logprobs, rtol=0, atol=1e-6)
    assert torch.equal(lensed.top_ids, plain.top_ids)


def test_files_move_both_ways(tmp_path, tl_lens, lens_tl):
    ours = lens_tl.save(tmp_path / "ours.pt")
    loaded_there = reference.JacobianLens.load(str(ours))
    for layer in lens_tl.source_layers:
        assert torch.equal(loaded_there.jacobians[layer], lens_tl.jacobians[layer].half().float())
    assert loaded_there.n_prompts == 3 and loaded_there.metadata["estimator"] == "jacobian_lens"
    tl_lens.save(str(tmp_path / "theirs.pt"))
    loaded_here = JacobianLens.load(tmp_path / "theirs.pt")
    for layer in tl_lens.source_layers:
        assert torch.equal(loaded_here.jacobians[layer], tl_lens.jacobians[layer].half().float())
    assert loaded_here.n_layers == 3 and loaded_here.metadata == tl_lens.metadata
    with pytest.raises(LensError, match="overwrite=True"):
        lens_tl.save(ours)
    full = lens_tl.save(tmp_path / "float32.pt", dtype=torch.float32)
    assert torch.equal(JacobianLens.load(full).jacobians[0], lens_tl.jacobians[0])


def test_merge_equals_one_fit_and_transformer_lens_merge(bridge, nn_model, texts, lens_nn):
    first = JacobianLens.fit(nn_model, texts[:1], skip_first=SKIP, prepend_bos=True, progress=False)
    rest = JacobianLens.fit(nn_model, texts[1:], skip_first=SKIP, prepend_bos=True, progress=False)
    merged = JacobianLens.merge([first, rest])
    assert merged.n_prompts == 3 and merged.metadata["n_prompts"] == 3
    for layer in merged.source_layers:
        torch.testing.assert_close(merged.jacobians[layer], lens_nn.jacobians[layer], rtol=0, atol=1e-6)
    theirs = reference.JacobianLens.merge([reference.JacobianLens(first.jacobians, n_prompts=1, d_model=64),
                                           reference.JacobianLens(rest.jacobians, n_prompts=2, d_model=64)])
    torch.testing.assert_close(merged.jacobians[0], theirs.jacobians[0], rtol=0, atol=1e-6)
    other = JacobianLens.fit(nn_model, texts[:1], skip_first=SKIP + 1, prepend_bos=True, progress=False)
    with pytest.raises(LensValueError, match="skip_first_positions"):
        JacobianLens.merge([first, other])


def test_checkpoint_resumes_bit_identical_and_loads_in_transformer_lens(tmp_path, nn_model, texts, lens_nn):
    path = tmp_path / "fit.pt"
    part = JacobianLens.fit(nn_model, texts, skip_first=SKIP, prepend_bos=True, progress=False, chunk=5,
                            checkpoint=path, max_prompts=1)
    assert part.n_prompts == 1
    state = torch.load(path, weights_only=True)
    assert set(state) >= {"jacobian_sum", "n_done", "next_idx", "source_layers", "target_layer", "skip_first"}
    assert state["n_done"] == 1 and state["skip_first"] == SKIP and state["target_layer"] == 2
    assert reference.JacobianLens.load(str(path)).n_prompts == 1  # the reference reads our checkpoint layout
    resumed = JacobianLens.fit(nn_model, texts, skip_first=SKIP, prepend_bos=True, progress=False, chunk=5,
                               checkpoint=path, max_prompts=None)
    assert resumed.n_prompts == 3
    for layer in resumed.source_layers:
        assert torch.equal(resumed.jacobians[layer], lens_nn.jacobians[layer])
    with pytest.raises(LensValueError, match="other settings"):
        JacobianLens.fit(nn_model, texts, skip_first=SKIP + 1, prepend_bos=True, progress=False, checkpoint=path)
    assert JacobianLens.load(path).n_prompts == 3  # a checkpoint is a lens too (means rebuilt)


def test_refusals(bridge, nn_model, lens_tl, texts, tmp_path):
    with pytest.raises(LensValueError, match="embeddings"):
        lp.transformer_lens.run_logit_lens(bridge, texts[0], lens=lens_tl)
    with pytest.raises(LensValueError, match="embeddings"):
        lp.nnsight.run_logit_lens(nn_model, texts[0], lens=lens_tl)
    with pytest.raises(LensValueError, match="inside a block"):
        lp.nnsight.run_logit_lens(nn_model, texts[0], lens=lens_tl, resid_mid=True, layers=["0_mid"])
    wide = JacobianLens({0: torch.eye(32)}, n_prompts=1, d_model=32)
    with pytest.raises(LensValueError, match="d_model"):
        lp.nnsight.run_logit_lens(nn_model, texts[0], lens=wide, layers=[1])
    deep = JacobianLens({5: torch.eye(64)}, n_prompts=1, d_model=64)
    with pytest.raises(LensValueError, match="deeper model"):
        lp.nnsight.run_logit_lens(nn_model, texts[0], lens=deep, layers=[1])
    with pytest.raises(LensValueError, match="source_layers"):
        JacobianLens.fit(nn_model, texts, source_layers=[2], progress=False)
    with pytest.raises(LensValueError, match="no prompt had more than"):
        JacobianLens.fit(nn_model, texts, skip_first=40, progress=False)
    evil = tmp_path / "evil.pt"
    torch.save({"J": {0: torch.eye(64)}, "d_model": 64, "hook": os.system}, evil)
    with pytest.raises(LensValueError, match="unpickling can run code"):
        JacobianLens.load(evil)
    nan = JacobianLens({0: torch.eye(64)}, n_prompts=1, d_model=64)
    nan.jacobians[0][0, 0] = float("nan")
    nan.save(tmp_path / "nan.pt")
    with pytest.raises(LensValueError, match="NaN"):
        JacobianLens.load(tmp_path / "nan.pt")


def test_compatibility_mode_is_refused(tokenizer, texts):
    from transformer_lens.model_bridge import TransformerBridge

    folded = TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"), tokenizer=tokenizer)
    folded.enable_compatibility_mode()
    with pytest.raises(LensValueError, match="compatibility mode"):
        JacobianLens.fit(folded, texts, progress=False)
    eye = JacobianLens({0: torch.eye(64), 1: torch.eye(64)}, n_prompts=1, d_model=64)
    with pytest.raises(LensValueError, match="compatibility mode"):  # the readout too: another residual basis
        lp.transformer_lens.run_logit_lens(folded, texts[0], lens=eye, layers=range(1, 4))


@pytest.mark.parametrize("kind", ["steer", "ablate", "swap"])
def test_interventions_equal_transformer_lens_hooks_on_both_backends(kind, bridge, nn_model, tl_lens, lens_tl, texts):
    text = texts[2]
    tokens = bridge.to_tokens(text)
    a, b = 487, 641
    if kind == "steer":
        theirs = tl_lens.steering_hooks(bridge, a, [0, 1], alpha=2.0, positions=[-1, -2])
        edit = lens_tl.steering(bridge, a, [0, 1], alpha=2.0, positions=[-1, -2])
    elif kind == "ablate":
        theirs = tl_lens.ablation_hooks(bridge, [a, b], [1])
        edit = lens_tl.ablation(bridge, [a, b], [1])
    else:
        theirs = tl_lens.swap_hooks(bridge, a, b, [0, 1], alpha=2.0)
        edit = lens_tl.swap(bridge, a, b, [0, 1], alpha=2.0)
    with torch.no_grad():
        expected = bridge.run_with_hooks(tokens, fwd_hooks=theirs)[:, -1]
        ours = bridge.run_with_hooks(tokens, fwd_hooks=lp.transformer_lens.jacobian_hooks(edit))[:, -1]
        clean = bridge(tokens)[:, -1]
    assert float((expected - clean).abs().max()) > 1e-3  # the edit changes the output
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    on_tl = lp.transformer_lens.run_jacobian_edit(bridge, text, edit, prepend_bos=True)
    on_nn = lp.nnsight.run_jacobian_edit(nn_model, text, edit, prepend_bos=True)
    expected_probs = torch.softmax(expected.float(), -1)[0]
    torch.testing.assert_close(on_tl.edited_probs[0], expected_probs[edit.tokens], rtol=0, atol=1e-6)
    torch.testing.assert_close(on_nn.edited_probs, on_tl.edited_probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(on_nn.kl, on_tl.kl, rtol=0, atol=1e-5)
    assert float(on_tl.kl[0]) > 0


def test_ablation_leaves_no_component_and_in_trace_edit(nn_model, lens_tl, texts):
    edit = lens_tl.ablation(nn_model, [487, 641], [1])
    vectors = lens_tl.lens_vectors(nn_model, [487, 641], 1)
    with torch.no_grad(), nn_model.trace(texts[0]):
        lp.nnsight.jacobian_edit(nn_model, edit)
        after = nn_model.model.layers[1].output.save()
    projection = after.float() @ vectors.T
    assert float(projection.abs().max()) < 1e-4 * float(after.abs().max()) * float(vectors.norm(dim=-1).max())


def test_remote_serialization_equals_local(nn_model, lens_nn, texts):
    local = lp.nnsight.run_logit_lens(nn_model, texts[0], lens=lens_nn, layers=range(1, 4))
    shipped = lp.nnsight.run_logit_lens(nn_model, texts[0], lens=lens_nn, layers=range(1, 4), remote="local")
    assert torch.equal(local.top_ids, shipped.top_ids)
    torch.testing.assert_close(local.top_logprobs, shipped.top_logprobs, rtol=0, atol=0)


def test_evaluate_lenses_scores_the_rows_it_covers(nn_model, lens_nn):
    blocks = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    ev = lp.evaluate_lenses(nn_model, blocks, [lp.LogitLens(), lens_nn], names=["logit", "jacobian"])
    assert ev.row_labels[0] == "embed"
    assert torch.isnan(ev.kl[1, 0]) and not torch.isnan(ev.kl[0, 0])  # no matrix for the embeddings
    assert float(ev.kl[1, -1]) == pytest.approx(0.0, abs=1e-6)  # the final row is the model's output
    assert not torch.isnan(ev.kl[1, 1:]).any()


def test_hub_names_resolve_without_network(monkeypatch, tmp_path, lens_tl):
    repo, filename, revision = JacobianLens.hub_file("google/gemma-2-2b")
    assert (repo, filename) == ("neuronpedia/jacobian-lens", "gemma-2-2b/jlens/Salesforce-wikitext/gemma-2-2b_jacobian_lens.pt")
    assert JacobianLens.hub_file("gemma-2-2b")[:2] == (repo, filename) and len(revision) == 40
    assert JacobianLens.hub_file("no-such-model") is None
    assert len(JacobianLens.published()) >= 30
    saved = lens_tl.save(tmp_path / "lens.pt")
    calls = []

    def fake_download(repo_id, filename, revision=None):
        calls.append((repo_id, filename, revision))
        return str(saved)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = JacobianLens.from_pretrained("gemma-2-2b")
    assert calls == [(repo, filename, revision)] and loaded.source_layers == lens_tl.source_layers
    JacobianLens.from_pretrained("someone/lenses", filename="x/lens.pt")
    assert calls[-1] == ("someone/lenses", "x/lens.pt", None)
    assert JacobianLens.from_pretrained(str(tmp_path)).n_prompts == 3  # a directory: lens.pt in it


@pytest.mark.slow
@pytest.mark.heavy
def test_smollm2_fit_and_readout_equal_transformer_lens(smollm2_bridge, smollm2_hf):
    """SmolLM2, three top blocks (the reference fit is slow on CPU: every backward pass runs through the blocks
    above the earliest source), two prompts: matrices within the derived bound (module docstring), readout top-5
    ids equal and log-probs within 1e-5, both backends."""
    model, tokenizer = smollm2_hf
    from lens_plugins.training.loop import builtin_corpus

    texts = [tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"][:27]) for t in builtin_corpus()[3:5]]
    layers = [26, 27, 28]
    theirs = reference.JacobianLens.fit(smollm2_bridge, texts, corpus="test", source_layers=layers,
                                        show_progress=False)
    ours = JacobianLens.fit(smollm2_bridge, texts, source_layers=layers, prepend_bos=True, progress=False)
    nn_model = lp.nnsight.wrap_model(model, tokenizer)
    ours_nn = JacobianLens.fit(nn_model, texts, source_layers=layers, prepend_bos=True, progress=False)
    for layer in layers:
        scale = float(theirs.jacobians[layer].abs().max())
        for mine in (ours, ours_nn):
            assert float((mine.jacobians[layer] - theirs.jacobians[layer]).abs().max()) <= 2.8e-4 * scale
    readout = theirs.readout(smollm2_bridge, texts[0], layers=layers + [29], top_k=5, return_full_logits=True)
    rows = ["27_pre", "28_pre", "29_pre", "29_post"]
    for run in (lp.transformer_lens.run_logit_lens, lp.nnsight.run_logit_lens):
        model_ = smollm2_bridge if run is lp.transformer_lens.run_logit_lens else nn_model
        same = JacobianLens(theirs.jacobians, n_prompts=theirs.n_prompts, d_model=576, metadata=theirs.metadata)
        result = run(model_, texts[0], lens=same, layers=rows, top_k=5, prepend_bos=True)
        assert result.labels == rows
        for r, layer in enumerate(layers + [29]):
            logits = readout.lens_logits[layer].float()
            top = torch.log_softmax(logits, -1).topk(5, dim=-1)
            assert torch.equal(result.top_ids[r, 0], top.indices)
            # Both readouts are float32: each log-prob carries ~sqrt(d_model) * eps * |log Z| of rounding (about
            # 1.2e-5 here for either, measured against float64), so they agree within twice that, not within 1e-5.
            bound = 2 * math.sqrt(576) * torch.finfo(torch.float32).eps * float(torch.logsumexp(logits, -1).abs().max())
            torch.testing.assert_close(result.top_logprobs[r, 0], top.values, rtol=0, atol=bound)


def test_a_lens_too_big_to_ship_is_routed_to_client_decoding(nn_model, lens_nn, texts):
    """Past ``max_bytes`` the request is refused with the client-side route; that route (downloaded block outputs
    decoded by ``decode_rows``) equals the shipped lens."""
    from lens_plugins.models.checkpoint import decode_rows

    rows = list(range(1, 4))
    tensors = lp.nnsight.lens_tensors(nn_model, lens_nn, layers=rows)
    assert tensors["weight"].numel() * 4 == 3 * 64 * 64 * 4  # what ships: J - I per row, float32
    with pytest.raises(LensValueError, match="decode_rows"):
        lp.nnsight.lens_tensors(nn_model, lens_nn, layers=rows, max_bytes=1000)
    shipped = lp.nnsight.run_logit_lens(nn_model, texts[0], lens=tensors, layers=rows, remote="local")
    with torch.no_grad(), nn_model.trace(texts[0]):
        out0 = nn_model.model.layers[0].output.save()
        out1 = nn_model.model.layers[1].output.save()
        out2 = nn_model.model.layers[2].output.save()
    stack = torch.stack([out0, out1, out2])  # block outputs 0, 1, 2 = rows 1_pre, 2_pre, 2_post
    token_ids = torch.tensor([nn_model.tokenizer(texts[0])["input_ids"]])
    client = decode_rows(stack, ["1_pre", "2_pre", "2_post"], lens_nn, lp.nnsight.decoder_for(nn_model), token_ids,
                         nn_model.tokenizer)
    assert torch.equal(client.top_ids, shipped.top_ids)
    torch.testing.assert_close(client.top_logprobs, shipped.top_logprobs, rtol=0, atol=1e-6)


def test_decompose_equals_transformer_lens(bridge, tl_lens, lens_tl, texts):
    """Nonnegative OMP over the lens vectors: the same support, coordinates and J-space split as TransformerLens
    4.3's ``decompose`` on block outputs of a real prompt; the reconstruction is the nonnegative combination."""
    _, cache = bridge.run_with_cache(bridge.to_tokens(texts[0]), names_filter=lambda n: n.endswith("hook_out"))
    for layer, position in [(0, -1), (1, 5), (1, -2)]:
        activation = cache[f"blocks.{layer}.hook_out"][0, position].detach()
        theirs = tl_lens.decompose(bridge, activation, layer, k=8)
        ours = lens_tl.decompose(bridge, activation, layer, k=8)
        assert torch.equal(ours.selected, theirs.selected_support) and torch.equal(ours.support, theirs.support)
        torch.testing.assert_close(ours.coordinates, theirs.coordinates.cpu(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.j_space, theirs.j_space_component, rtol=0, atol=1e-4)
        vectors = lens_tl.lens_vectors(bridge, ours.support.tolist(), layer)
        torch.testing.assert_close(ours.reconstruction, ours.coordinates @ vectors, rtol=0, atol=1e-4)
        assert bool((ours.coordinates > 0).all()) and len(ours.tokens) == len(ours.support)
        assert 0 < ours.explained() <= 1
        residual = activation - ours.j_space  # orthogonal to every selected lens vector
        selected = lens_tl.lens_vectors(bridge, ours.selected.tolist(), layer)
        assert float((selected @ residual).abs().max()) < 1e-3 * float(selected.norm(dim=-1).max() * activation.norm())
    with pytest.raises(LensValueError, match="one residual vector"):
        lens_tl.decompose(bridge, torch.zeros(3, 64), 0)


def test_fit_where_the_model_runs_equals_the_local_fit(nn_model, texts, lens_nn):
    """``remote="local"``: the request NDIF would get (the body serialised, the backward passes taken inside the
    trace, only the matrices sent back) gives the local fit's matrices."""
    params = list(nn_model._module.parameters())
    for p in params:
        p.requires_grad_(False)  # as an NDIF server loads every model
    try:
        far = JacobianLens.fit(nn_model, texts, skip_first=SKIP, prepend_bos=True, progress=False, chunk=5,
                               remote="local")
    finally:
        for p in params:
            p.requires_grad_(True)
    assert far.n_prompts == 3
    for layer in far.source_layers:
        torch.testing.assert_close(far.jacobians[layer], lens_nn.jacobians[layer], rtol=0, atol=1e-6)


def test_transform_of_any_rows_uses_the_fitted_depth():
    """``transform`` on a row subset that does not end at the final row (a causal check maps one row) reads the
    model's depth from the lens, not from the last row given: the same mapping as inside the full selection."""
    from lens_plugins.core.rows import Row

    g = torch.Generator().manual_seed(0)
    d = 8
    lens = JacobianLens({0: torch.randn(d, d, generator=g), 1: torch.randn(d, d, generator=g)}, n_prompts=1,
                        d_model=d, metadata={"target_layer": 2})
    full = [Row.parse(label) for label in ("1_pre", "2_pre", "2_post")]
    resid = torch.randn(3, 4, d, generator=g)
    whole = lens.transform(resid, full)
    for r in range(2):
        torch.testing.assert_close(lens.transform(resid[r:r + 1], full[r:r + 1]), whole[r:r + 1], rtol=0, atol=0)
    torch.testing.assert_close(whole[0], resid[0] @ lens.jacobians[0].T, rtol=1e-6, atol=1e-6)
