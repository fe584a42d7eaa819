"""Against a real NDIF server: each remote lens equals the same lens run locally, bit for bit.

The model is ``lp.nnsight.remote_model(<local SmolLM2 directory>)``: the server loads the same files, and
``remote=False`` loads them here. Every comparison runs the identical trace body both ways.
"""

import pytest
import torch

import lens_plugins as lp
from helpers import PROMPT, assert_identical

ALL_REDUCTIONS = ["top_k", "entropy", "kl_final_row", "kl_row_final", "js_final", "tv_final", "kl_input_row",
                  "kl_next_row", "final_top1", "next_token", "input_token"]

LENS_CASES = {
    "defaults and targets": dict(targets=[" Paris", " London"]),
    "every reduction, token sets, positions": dict(
        top_k=3, targets=[" Paris", 1234], positions=[0, -2, -1], reductions=ALL_REDUCTIONS,
        token_sets={"France": [" Paris", " Lyon", "Paris"], "England": [" London"]},
    ),
    "a single reduction": dict(top_k=20, reductions=["top_k"], positions=-1),
}


def both(model, body, prompt=PROMPT):
    """``body(model)`` inside a trace of ``prompt`` on the server and here. (A remote body runs only on
    the server, which sends back what it saved into the body's own variables: assign to plain names.)"""
    with model.trace(prompt, remote=True):
        remote = body(model)
    with model.trace(prompt):
        local = body(model)
    return remote, local


def local_lens(model, **kwargs):
    with model.trace(PROMPT):
        lens = lp.nnsight.logit_lens(model, **kwargs)
    return lp.nnsight.logit_lens_result(lens, model)


def test_the_server_cannot_import_lens_plugins(model):
    """So anything the lens needs there must ship with the request (what a site-packages install does
    through nnsight.register); this suite would catch a helper that forgot to."""
    with model.trace(PROMPT, remote=True):
        import importlib.util

        import nnsight

        spec = nnsight.save(str(importlib.util.find_spec("lens_plugins")))
    assert spec == "None"


@pytest.mark.parametrize("kwargs", LENS_CASES.values(), ids=LENS_CASES.keys())
def test_logit_lens(model, kwargs):
    remote, local = both(model, lambda m: lp.nnsight.logit_lens(m, **kwargs))
    assert_identical(remote, local)
    result = lp.nnsight.logit_lens_result(remote, model)
    assert result.labels[0] == "embed" and result.labels[-1] == "29_post"
    if "targets" in kwargs and "positions" not in kwargs:
        assert result.top_tokens(pos=-1)["29_post"][0][0] == " Paris"
        assert result.rank_of(" Paris")[-1, 0, -1] == 1


@pytest.mark.parametrize("sublayers", [True, "outputs"])
def test_sublayers(model, sublayers):
    remote, local = both(model, lambda m: lp.nnsight.logit_lens(m, top_k=5, targets=[" Paris"], sublayers=sublayers))
    assert_identical(remote, local)
    labels = lp.nnsight.logit_lens_result(remote, model).labels
    suffix = "_out" if sublayers == "outputs" else ""
    assert labels[:3] == ["embed", f"0_attn{suffix}", f"0_mlp{suffix}"] and f"29_mlp{suffix}" in labels[-2:]


def test_attribution_by_head(model):
    remote, local = both(model, lambda m: lp.nnsight.attribution(m, " Paris", " London"))
    assert_identical(remote, local)
    by_head = lp.nnsight.attribution_result(remote, model, by="head")
    assert by_head.top(10) == lp.nnsight.attribution_result(local, model, by="head").top(10)
    assert abs(by_head.error) < 1e-4  # the parts sum to the logit difference they explain


def test_attention_views(model, smollm2_dir):
    """Attention runs in a remote trace: the server loads SmolLM2 with its own attention implementation (the
    model key names none), and the trace switches it to eager for its forward pass. Remote equals local bit
    for bit, both equal transformers' own eager ``output_attentions``, and the server's model is left as it
    was."""
    from transformers import AutoModelForCausalLM

    def implementation():
        with model.trace(PROMPT, remote=True):
            import nnsight

            name = nnsight.save(str(model.config._attn_implementation))
        return name

    before = implementation()
    assert before != "eager", "the server's default implementation forms no weights: the switch is what is tested"
    remote, local = both(model, lambda m: lp.nnsight.attention(m, [0, 17, 29]))
    assert_identical(remote, local)
    result = lp.nnsight.attention_result(remote, model)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = hf(**model.tokenizer(PROMPT, return_tensors="pt"), output_attentions=True).attentions
    for i, layer in enumerate(result.layers):
        torch.testing.assert_close(result.patterns[i], expected[layer], rtol=0, atol=1e-6)
    assert implementation() == before


def test_a_batch_of_invokes(model):
    out = {}
    for remote in (True, False):
        with model.trace(remote=remote) as tracer:
            with tracer.invoke(PROMPT):
                france = lp.nnsight.logit_lens(model, top_k=5, targets=[" Paris"])
            with tracer.invoke("The Eiffel Tower stands in the city of"):
                eiffel = lp.nnsight.logit_lens(model, top_k=5, targets=[" Paris"])
        out[remote] = (france, eiffel)
    assert_identical(out[True], out[False])
    for lens, prompt in zip(out[True], [PROMPT, "The Eiffel Tower stands in the city of"]):
        result = lp.nnsight.logit_lens_result(lens, model)  # each invoke's own prompt, padded to the batch's length
        real = result.token_ids[0][result.attention_mask[0].bool()]
        assert real.tolist() == model.tokenizer(prompt)["input_ids"]


def test_a_lens_after_a_patch_in_an_earlier_invoke(model):
    out = {}
    for remote in (True, False):
        with model.trace(remote=remote) as tracer:
            with tracer.invoke(PROMPT):
                model.model.layers[20].output[:, -1] = 0.0
            with tracer.invoke():
                lens = lp.nnsight.logit_lens(model, top_k=5, targets=[" Paris"])
        out[remote] = lens
    assert_identical(out[True], out[False])
    patched = lp.nnsight.logit_lens_result(out[True], model)
    clean = local_lens(model, top_k=5, targets=[" Paris"])
    assert torch.equal(patched.top_ids[:21], clean.top_ids[:21])  # embed .. 20_pre: before the patch
    assert not torch.equal(patched.entropy[21:, :, -1], clean.entropy[21:, :, -1])  # 21_pre on: after it
    assert torch.equal(patched.entropy[21:, :, :-1], clean.entropy[21:, :, :-1])  # other positions untouched


def test_a_session_of_two_traces(model):
    """The second trace patches in what the first read: one request, two forward passes."""
    out = {}
    for remote in (True, False):
        with model.session(remote=remote):
            with model.trace() as tracer:
                with tracer.invoke("The capital of Italy is"):
                    rome = model.model.layers[20].output[:, -1].clone()
                with tracer.invoke():
                    first = lp.nnsight.logit_lens(model, top_k=5, targets=[" Rome", " Paris"])
            with model.trace() as tracer:
                with tracer.invoke(PROMPT):
                    model.model.layers[20].output[:, -1] = rome
                with tracer.invoke():
                    second = lp.nnsight.logit_lens(model, top_k=5, targets=[" Rome", " Paris"])
        out[remote] = (first, second)
    assert_identical(out[True], out[False])
    italy, patched = (lp.nnsight.logit_lens_result(lens, model) for lens in out[True])
    assert italy.rank_of(" Rome")[-1, 0, -1] == 1
    clean = local_lens(model, top_k=5, targets=[" Rome", " Paris"])
    assert torch.equal(patched.top_ids[:21], clean.top_ids[:21])  # before the patch: France's own rows
    # From 21_pre on, France's last position carries Italy's layer-20 residual: Rome gains on Paris there.
    rome, paris = patched.logprob_of(" Rome")[21:, 0, -1], patched.logprob_of(" Paris")[21:, 0, -1]
    clean_gap = clean.logprob_of(" Rome")[21:, 0, -1] - clean.logprob_of(" Paris")[21:, 0, -1]
    assert ((rome - paris) > clean_gap).all()


def test_jacobian_lens_and_edit(model):
    """A Jacobian lens ships as tensors (``J - I`` per row, 30 x 576^2 floats): the remote lens equals the local
    one bit for bit, and so does a steering edit's effect on the output."""
    generator = torch.Generator().manual_seed(0)
    matrices = {layer: torch.eye(576) + 0.005 * torch.randn(576, 576, generator=generator) for layer in range(29)}
    jlens = lp.JacobianLens(matrices, n_prompts=1, d_model=576, metadata={"target_layer": 29})
    rows = list(range(1, 31))
    local = lp.nnsight.run_logit_lens(model, PROMPT, lens=jlens, layers=rows, targets=[" Paris"])
    remote = lp.nnsight.run_logit_lens(model, PROMPT, lens=jlens, layers=rows, targets=[" Paris"], remote=True)
    assert remote.labels[0] == "1_pre" and remote.labels[-1] == "29_post"
    assert torch.equal(remote.top_ids, local.top_ids)
    assert torch.equal(remote.top_logprobs, local.top_logprobs)
    edit = jlens.steering(model, " London", [10, 20], alpha=2.0, positions=[-1])
    here = lp.nnsight.run_jacobian_edit(model, PROMPT, edit)
    there = lp.nnsight.run_jacobian_edit(model, PROMPT, edit, remote=True)
    assert torch.equal(there.edited_probs, here.edited_probs) and torch.equal(there.kl, here.kl)
    assert float(here.kl[0]) > 0 and not torch.equal(here.edited_probs, here.clean_probs)  # the edit did something


def test_jacobian_lens_fit_on_the_server(model):
    """The fit where the model runs: each prompt's backward passes are taken inside the trace on the server and
    only its matrices come back; they equal the local fit's."""
    texts = ["The capital of France is Paris, and the capital of Italy is Rome. Spain's capital is Madrid.",
             "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # five"]
    options = dict(source_layers=[27, 28], skip_first=8, max_seq_len=20, chunk=96, progress=False)
    here = lp.JacobianLens.fit(model, texts, **options)
    there = lp.JacobianLens.fit(model, texts, remote=True, **options)
    assert there.n_prompts == here.n_prompts == 2
    for layer in (27, 28):
        scale = float(here.jacobians[layer].abs().max())
        assert float((there.jacobians[layer] - here.jacobians[layer]).abs().max()) <= 1e-5 * scale


def test_mid_block_lenses_remote_equal_local(model):
    """Tuned-lens mid translators and Jacobian-lens mid matrices (issue 29, item 3) ship as the request's affine
    tensors: the mid rows decode on the server bit for bit as here, and differ from the logit lens's."""
    generator = torch.Generator().manual_seed(1)
    tuned = lp.TunedLens.for_model(model, resid_mid=True)
    with torch.no_grad():
        for translator in list(tuned.layer_translators) + list(tuned.mid_translators):
            translator.weight.copy_(0.005 * torch.randn(576, 576, generator=generator))
    jlens = lp.JacobianLens({layer: torch.eye(576) + 0.005 * torch.randn(576, 576, generator=generator)
                             for layer in range(29)}, n_prompts=1, d_model=576, metadata={"target_layer": 29},
                            mid_jacobians={layer: torch.eye(576) + 0.005 * torch.randn(576, 576, generator=generator)
                                           for layer in range(30)})
    rows = ["5_mid", "6_pre", "6_mid", "28_mid", "29_mid", "29_post"]
    plain = lp.nnsight.run_logit_lens(model, PROMPT, resid_mid=True, layers=rows, targets=[" Paris"])
    for lens in (tuned, jlens):
        local = lp.nnsight.run_logit_lens(model, PROMPT, lens=lens, resid_mid=True, layers=rows, targets=[" Paris"])
        remote = lp.nnsight.run_logit_lens(model, PROMPT, lens=lens, resid_mid=True, layers=rows, targets=[" Paris"],
                                           remote=True)
        assert remote.labels == rows
        assert torch.equal(remote.top_ids, local.top_ids)
        assert torch.equal(remote.top_logprobs, local.top_logprobs)
        assert not torch.equal(local.top_logprobs[0], plain.top_logprobs[0])


def test_activation_patching_remote_equals_local(model):
    """The patching sweep on the server (one request per batch of patched cells, reductions only) equals the
    same sweep run here, cone included."""
    options = dict(answer=" Mary", foil=" John", layers=["6_pre", "12_mid", -1], resid_mid=True, positions=[9, 13],
                   cone=True, batch_size=4)
    source = "When John and Mary went to the store, John gave a drink to"
    target = "When John and Mary went to the store, Mary gave a drink to"
    here = lp.nnsight.run_patching(model, source, target, **options)
    there = lp.nnsight.run_patching(model, source, target, remote=True, **options)
    for name in ("values", "source_values", "target_values", "cone"):
        assert torch.equal(getattr(there, name), getattr(here, name)), name
    assert there.values.shape[-2:] == (3, 2)  # rows x positions: every requested cell came back
