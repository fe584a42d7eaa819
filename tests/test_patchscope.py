"""Patchscopes: self-patching reproduces the model, a last-block target is the logit lens, both backends agree,
the remote request runs where lens_plugins cannot be imported, batching and mappings, errors."""

import math

import pytest
import torch

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends import transformer_lens as tla
from lens_plugins.core import patching
from lens_plugins.methods.patchscope import IDENTITY_PROMPT, PatchscopeResult
from lens_plugins.core.trace.patchscope import patch_and_read
from test_remote_serialization import SerializeThenRunLocally, run_on_server
from tiny_models import tiny_model

PROMPT = "The capital of France is"
TOL = 1e-4  # float32 rounding of matmuls of other shapes (a batch of k copies vs one prompt), as in test_nnsight
EXACT = ("top_ids", "final_top1", "final_top1_rank", "next_token_rank")
CLOSE = ("top_logprobs", "entropy", "kl_final_row", "kl_row_final", "final_top1_logprob", "next_token_logprob")


@pytest.fixture(scope="module")
def smollm2(smollm2_hf):
    return lpn.wrap_model(*smollm2_hf)


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    """The same tiny Llama weights behind both backends."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=tiny_model("llama"),
                                                 tokenizer=smollm2_tokenizer).eval()
    return bridge, lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)


SOURCE = torch.tensor([[5, 17, 300, 42, 99, 7]])
TARGET = torch.tensor([11, 12, 13, 14, 15])


def assert_same(ours, theirs, rows=slice(None), exact=EXACT, close=CLOSE, tol=TOL):
    for name in exact:
        assert torch.equal(getattr(ours, name)[rows] if name != "final_top1" else ours.final_top1,
                           getattr(theirs, name)[rows] if name != "final_top1" else theirs.final_top1), name
    for name in close:
        torch.testing.assert_close(getattr(ours, name)[rows], getattr(theirs, name)[rows], atol=tol, rtol=0,
                                   equal_nan=True, msg=name)


# --- the invariants on the real model ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_self_patch_reproduces_the_models_own_output_exactly(backend, smollm2_bridge, smollm2):
    """h written back into its own prompt at its own row and position changes nothing: every row's
    Patchscope is the model's own prediction there, bit for bit (one pair per forward, so the target runs
    the very shapes the source did)."""
    model = smollm2_bridge if backend == "transformer_lens" else smollm2
    tokens = smollm2_bridge.to_tokens(PROMPT)
    position = 3  # " of": a position with a next token, inside the prompt
    res = lp.patchscope(model, tokens, positions=[position], target_prompt=tokens[0], target_position=position,
                        batch_size=1, top_k=5)
    assert isinstance(res, PatchscopeResult) and len(res.labels) == 31
    assert torch.equal(res.kl_final_row, torch.zeros_like(res.kl_final_row))
    assert torch.equal(res.kl_row_final, torch.zeros_like(res.kl_row_final))
    assert (res.final_top1_rank == 1).all()
    for name in ("top_ids", "top_logprobs", "entropy", "next_token_logprob", "next_token_rank"):
        values = getattr(res, name)
        assert torch.equal(values, values[-1:].expand_as(values)), name
    # ... and that prediction is the model's own: its logits at that position
    with torch.no_grad():
        logits = smollm2_bridge(tokens)[0, position].float()
    assert res.top_ids[-1, 0, 0].tolist() == logits.topk(5).indices.tolist()
    torch.testing.assert_close(res.top_logprobs[-1, 0, 0], logits.log_softmax(-1).topk(5).values, atol=TOL, rtol=0)


def test_self_patch_in_a_batch_matches_to_rounding(smollm2_bridge):
    """With many pairs per forward the target's matmuls have another shape, so the self-patch agrees to float
    rounding: every divergence from the model's own prediction is at float32 noise level."""
    tokens = smollm2_bridge.to_tokens(PROMPT)
    res = lp.patchscope(smollm2_bridge, tokens, positions=[-1], target_prompt=tokens[0], batch_size=64)
    assert (res.top_ids[..., 0] == res.final_top1).all()
    assert res.kl_final_row.abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_target_after_the_last_block_is_the_logit_lens(backend, smollm2_bridge, smollm2):
    """Written into the last block's output, a hidden state goes straight to the final norm and unembedding:
    every row is the logit lens's row; and with l* = l, the last row (written where it was read) is the
    logit lens's final row."""
    model = smollm2_bridge if backend == "transformer_lens" else smollm2
    tokens = smollm2_bridge.to_tokens(PROMPT)
    lens = tla.run_logit_lens(smollm2_bridge, PROMPT, positions=[1, -1], top_k=5, prepend_bos=True)  # as tokens
    read_out = lp.patchscope(model, tokens, positions=[1, -1], target_layer="29_post", top_k=5)
    assert read_out.target_labels == ["29_post"] * 31
    assert_same(read_out, lens)
    same_row = lp.patchscope(model, tokens, positions=[1, -1], layers=[-1], top_k=5)
    assert same_row.labels == ["29_post"] and same_row.target_labels == ["29_post"]
    assert_same(same_row, lens, rows=slice(-1, None))


def test_transformer_lens_and_nnsight_agree_on_smollm2(smollm2_bridge, smollm2):
    """The default identity prompt, a mapping and a target row other than the source's, generation."""
    tokens = smollm2_bridge.to_tokens(PROMPT)
    target = smollm2_bridge.to_tokens(IDENTITY_PROMPT)[0]
    scale = (torch.full((576,), 0.9), None)
    common = dict(layers=[0, 6, 12, 18, 24, -1], positions=[2, -1], target_prompt=target, targets=[" Paris"],
                  mapping=(torch.diag(scale[0]), torch.zeros(576)), max_new_tokens=2, batch_size=5)
    for target_layer in (None, "10_pre"):
        theirs = lp.patchscope(smollm2_bridge, tokens, target_layer=target_layer, **common)
        ours = lp.patchscope(smollm2, tokens, target_layer=target_layer, **common)
        assert ours.labels == theirs.labels and ours.target_labels == theirs.target_labels
        assert_same(ours, theirs, exact=EXACT + ("target_ranks",), close=CLOSE + ("target_logprobs",))
        assert torch.equal(ours.generated_ids, theirs.generated_ids)


def test_identity_patchscope_reads_paris_late(smollm2_bridge):
    """On the paper's token-identity prompt, the late layers' hidden states make the model say ' Paris'."""
    res = lp.patchscope(smollm2_bridge, PROMPT, positions=[-1], layers=[26, 28, -1], max_new_tokens=1)
    assert all(res.token(i) == " Paris" for i in res.top_ids[:, 0, 0, 0].tolist())
    assert set(res.generated(-1).values()) == {" Paris"}
    assert res.top1_agreement().all()


# --- tiny models: exact agreement, batching, mappings ------------------------------------------------


def test_backends_agree_exactly_on_a_tiny_model(tiny):
    bridge, model = tiny
    common = dict(target_prompt=TARGET, positions=[1, -1], batch_size=3, max_new_tokens=3, top_k=4, targets=[17])
    theirs = lp.patchscope(bridge, SOURCE, **common)
    ours = lp.patchscope(model, SOURCE, **common)
    assert_same(ours, theirs, exact=EXACT + ("target_ranks", "top_logprobs"), close=("entropy", "kl_final_row"),
                tol=0)
    assert torch.equal(ours.generated_ids, theirs.generated_ids)


def test_one_target_forward_per_batch_of_pairs(tiny, monkeypatch):
    bridge, _ = tiny
    calls = []
    original = bridge.run_with_hooks
    monkeypatch.setattr(bridge, "run_with_hooks", lambda tokens, **kw: calls.append(tokens.shape[0]) or original(tokens, **kw))
    whole = lp.patchscope(bridge, SOURCE, target_prompt=TARGET, batch_size=7)  # 4 rows x 6 positions = 24 pairs
    assert calls == [7, 7, 7, 3]
    calls.clear()
    one = lp.patchscope(bridge, SOURCE, target_prompt=TARGET, batch_size=24)
    assert calls == [24]
    assert_same(whole, one, exact=("top_ids", "final_top1"), close=CLOSE[:4], tol=TOL)


def test_mappings(tiny):
    bridge, _ = tiny
    d = bridge.cfg.d_model
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(d, d, generator=generator) / math.sqrt(d), torch.randn(d, generator=generator)
    run = lambda mapping: lp.patchscope(bridge, SOURCE, target_prompt=TARGET, mapping=mapping)  # noqa: E731
    plain = run(None)
    assert_same(run((torch.eye(d), None)), plain, close=CLOSE[:4], tol=0)
    affine = run((weight, bias))
    assert_same(run(lambda h: h @ weight.T + bias), affine, close=CLOSE[:4], tol=0)
    linear = torch.nn.Linear(d, d)
    with torch.no_grad():
        linear.weight.copy_(weight), linear.bias.copy_(bias)
    assert_same(run(linear), affine, close=CLOSE[:4], tol=1e-5)
    assert not torch.equal(affine.top_logprobs, plain.top_logprobs)


def test_core_batching_arithmetic():
    batches = patching.pair_batches(3, 2, 4)
    assert [(r.tolist(), p.tolist()) for r, p in batches] == [([0, 0, 1, 1], [0, 1, 0, 1]), ([2, 2], [0, 1])]
    assert list(patching.sites_of(["3_pre", "embed", "2_post", "3_pre"]).items()) == \
        [("embed", [1]), ("2_post", [2]), ("3_pre", [0, 3])]
    hidden = torch.zeros(3, 4, 2)
    patching.write_rows(hidden, [0, 2], 1, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert hidden.nonzero().tolist() == [[0, 1, 0], [0, 1, 1], [2, 1, 0], [2, 1, 1]]


def test_result_plugs_into_the_views(tiny):
    bridge, _ = tiny
    res = lp.patchscope(bridge, SOURCE, target_prompt=TARGET, positions=[-2, -1], max_new_tokens=2)
    frame = res.to_dataframe()
    assert len(frame) == 4 * 2 and set(frame["target_row"]) == set(res.labels)
    assert frame["generated"].map(len).gt(0).all()
    z = res.plot("kl_final_row").data[0].z
    assert len(z) == 4 and all(len(row) == 2 for row in z)
    assert set(res.generated(-1)) == set(res.labels)


# --- remote ------------------------------------------------------------------------------------------


def test_remote_request_runs_where_lens_plugins_cannot_be_imported(tmp_path, smollm2_tokenizer):
    hf = tiny_model("gemma2")  # (1 + w) norm, embedding scale, soft-cap
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    k, d = 3, hf.config.hidden_size
    values = torch.randn(k, d, generator=torch.Generator().manual_seed(0))
    reference = torch.randn(k, d, generator=torch.Generator().manual_seed(1))
    target_ids = torch.tensor([[17], [5], [-1]])
    backend = SerializeThenRunLocally()
    with model.trace(TARGET.expand(k, -1), backend=backend):
        ps = patch_and_read(model, values, ["embed", "1_pre", "2_post"], 3, reference, target_ids, 4,
                            ("top_k", "entropy", "kl_final_row", "final_top1", "targets"), True)
    # the request carries the patch and the shipped source, not the weights: the patch's own bytes are in it
    # (the check can see a tensor), no row of the embedding or of any other parameter is
    assert values[0].numpy().tobytes() in backend.blob
    for name, param in hf.named_parameters():
        first = param.detach().reshape(-1)[:16].float()
        if first.unique().numel() > 1:  # a constant row (a norm's ones) could match any run of equal floats
            assert first.numpy().tobytes() not in backend.blob, f"the request carries the weights ({name})"
    assert len(backend.blob) < hf.get_input_embeddings().weight.numel() * 4  # smaller than W_E alone
    served = run_on_server(tmp_path, hf, backend.blob, saved_name="ps")
    assert served.keys() == ps.keys()
    assert torch.equal(served["next_token"], ps["next_token"])
    for name, value in ps["stats"].items():
        torch.testing.assert_close(served["stats"][name], value, rtol=0, atol=0, equal_nan=True, msg=name)


def test_remote_local_simulation_matches_local(tiny):
    _, model = tiny
    local = lp.patchscope(model, SOURCE, target_prompt=TARGET, positions=[-1])
    simulated = lp.patchscope(model, SOURCE, target_prompt=TARGET, positions=[-1], remote="local")
    assert_same(simulated, local, tol=0)


# --- errors: the same on both backends ---------------------------------------------------------------


@pytest.mark.parametrize("backend", [0, 1])
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(reductions=["kl_next_row"]), ValueError, "separate forward passes"),
    (dict(target_position=9), IndexError, "target_position 9 is out of range"),
    (dict(target_layer="7_pre"), KeyError, "no row labelled '7_pre'"),
    (dict(mapping=lambda h: h[:, :3]), ValueError, "must keep the shape"),
    (dict(mapping=(torch.eye(3), None)), ValueError, "does not take hidden states of width 64"),
    (dict(batch_size=0), ValueError, "batch_size must be at least 1"),
    (dict(targets=["Paris is"]), ValueError, "not one"),
])
def test_bad_input_is_refused_alike(tiny, backend, kwargs, error, match):
    with pytest.raises(error, match=match):
        lp.patchscope(tiny[backend], SOURCE, target_prompt=TARGET, **kwargs)


@pytest.mark.parametrize("first", ["lens_plugins.backends.transformer_lens.patchscope",
                                   "lens_plugins.backends.nnsight.patchscope"])
def test_the_verb_is_exported_by_each_backend_whichever_module_loads_first(first):
    """``lp.transformer_lens.run_patchscope`` / ``lp.nnsight.run_patchscope`` come from the Patchscope adapters, which
    read through the backend modules: importing either side first must work (a fresh interpreter)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    backend = "transformer_lens" if ".transformer_lens." in first else "nnsight"
    code = (f"import importlib, lens_plugins as lp; m = importlib.import_module({first!r}); "
            f"assert getattr(lp, {backend!r}).run_patchscope is m.run_patchscope")
    root = str(Path(lp.__file__).parent.parent)  # this checkout's package, not another install's
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


def test_not_a_model():
    with pytest.raises(TypeError, match="TransformerLens model .* or an nnsight model"):
        lp.patchscope(object(), "hello")
