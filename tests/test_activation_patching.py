"""Activation patching read through the lens: exact invariants on SmolLM2 (a prompt patched into itself changes
nothing; the final row at the metric position gives the source's metric; the cone is zero before the patch),
both backends agree, a cell equals a hand-written hook patch, a prompt set is its pairs run one by one, the
bootstrap equals a direct percentile computation, the remote request runs where lens_plugins cannot be
imported and downloads only the metric grid, errors are the same on both backends."""

import numpy as np
import pytest
import torch
from test_remote_serialization import SerializeThenRunLocally, run_on_server
from tiny_models import tiny_model

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.core.trace.activation_patching import patch_and_measure
from lens_plugins.methods.activation_patching import PatchingResult, bootstrap

# IOI-style pairs: the source names the other person second, so the answer flips; every prompt is 14 tokens.
SOURCES = ["When John and Mary went to the store, John gave a drink to",
           "When Tom and Anna went to the park, Tom gave a ball to",
           "When James and Sarah went to the shop, James gave a book to"]
TARGETS = ["When John and Mary went to the store, Mary gave a drink to",
           "When Tom and Anna went to the park, Anna gave a ball to",
           "When James and Sarah went to the shop, Sarah gave a book to"]
ANSWERS, FOILS = [" Mary", " Anna", " Sarah"], [" John", " Tom", " James"]
ROWS = ["embed", "6_pre", "12_mid", "20_pre", -1]  # embed, pre rows, a mid row, the final row
POSITIONS = [2, 9, 12, 13]          # " and", the repeated name, " to" - 1, the last token
TOL = 2e-3  # float32 rounding between forwards of other batch shapes (logit differences are ~10)


@pytest.fixture(scope="module")
def smollm2(smollm2_hf):
    return lpn.wrap_model(*smollm2_hf)


@pytest.fixture(scope="module")
def models(smollm2_bridge, smollm2):
    return {"transformer_lens": smollm2_bridge, "nnsight": smollm2}


def sweep(model, source=SOURCES[0], target=TARGETS[0], **kwargs):
    options = dict(answer=ANSWERS[0], foil=FOILS[0], layers=ROWS, resid_mid=True, positions=POSITIONS, batch_size=8)
    options.update(kwargs)
    return lp.patching(model, source, target, **options)


# --- exact invariants, each backend -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_a_prompt_patched_into_itself_changes_nothing_exactly(backend, models):
    res = sweep(models[backend], TARGETS[0], TARGETS[0], cone=True)
    assert isinstance(res, PatchingResult) and res.labels == ["embed", "6_pre", "12_mid", "20_pre", "29_post"]
    assert torch.equal(res.source_values, res.target_values)
    assert torch.equal(res.values, res.target_values[:, None, None].expand_as(res.values))
    assert torch.equal(res.cone, res.target_cone[:, None, None].expand_as(res.cone))


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
@pytest.mark.parametrize("metric", ["logit_diff", "prob", "rank"])
def test_the_final_row_at_the_metric_position_gives_the_source_metric_exactly(backend, metric, models):
    """A patch of the last block's output at the metric position hands the output the source's own vector;
    at any other position it cannot reach the metric at all."""
    res = sweep(models[backend], metric=metric, layers=[-1], resid_mid=False, positions=None)
    assert res.labels == ["29_post"] and res.positions == list(range(14))
    assert res.values[0, 0, -1] == res.source_values[0]
    assert torch.equal(res.values[0, 0, :-1], res.target_values.expand(13))
    assert res.source_values[0] != res.target_values[0]  # the pair does differ


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_the_cone_is_zero_before_the_patched_row_and_position_exactly(backend, models):
    res = sweep(models[backend], cone=True)
    assert res.cone.shape == (1, 5, 4, 61, 14)  # the plan with resid_mid: embed, 0_mid, 1_pre, 1_mid, ...
    for r, label in enumerate(res.labels):
        first = res.read_labels.index(label)
        for i, pos in enumerate(res.positions):
            change = res.cone_change(label, pos)
            assert torch.equal(change[:first], torch.zeros_like(change[:first])), (label, pos)
            assert torch.equal(change[:, :pos], torch.zeros_like(change[:, :pos])), (label, pos)
            # the patched cell holds the source's vector, so the lens reads there what it reads in the source
            patched, source = res.cone[0, r, i, first, pos], res.source_cone[0, first, pos]
            assert patched == source if not label.endswith("_mid") or backend == "transformer_lens" else \
                abs(patched - source) < 1e-4, (label, pos)
    assert res.cone_change("6_pre", 9).abs().max() > 1  # the name's position moves what follows
    # the cone's final row at the metric position is the sweep's own metric
    assert torch.equal(res.cone[0, :, :, -1, -1], res.values[0])


# --- agreement between independent paths ----------------------------------------------------------------


@pytest.mark.parametrize("metric", ["logit_diff", "prob"])
def test_transformer_lens_and_nnsight_agree(metric, models):
    labels = _plan_labels()
    lens = lp.AffineLens(labels, *_random_affine(len(labels), 576)) if metric == "logit_diff" else None
    cone = metric == "logit_diff"  # a probability cone streams the vocabulary at every cell: slow on a CPU
    tl = sweep(models["transformer_lens"], metric=metric, lens=lens, cone=cone)
    nn = sweep(models["nnsight"], metric=metric, lens=lens, cone=cone)
    tol = TOL if metric == "logit_diff" else 1e-4
    names = ("values", "source_values", "target_values") + (("cone", "source_cone", "target_cone") if cone else ())
    for name in names:
        torch.testing.assert_close(getattr(nn, name), getattr(tl, name), atol=tol, rtol=0, msg=name)
    assert tl.labels == nn.labels and tl.read_labels == nn.read_labels


def _plan_labels():
    from lens_plugins.core.rows import plan

    return [row.label for row in plan(30, resid_mid=True)]


def _random_affine(rows, d):
    generator = torch.Generator().manual_seed(0)
    return 0.01 * torch.randn(rows, d, d, generator=generator), 0.01 * torch.randn(rows, d, generator=generator)


def test_a_cell_equals_a_hand_written_hook_patch(smollm2_bridge):
    """One cell against TransformerLens's own patching idiom: the source cached, the target run with a hook that
    overwrites the residual at one position, the metric from the model's logits (separate forwards of batch 1)."""
    model = smollm2_bridge
    cells = dict(layers=["6_pre", "12_mid", "20_pre"], positions=[9, 12])
    res, prob, rank = (sweep(model, metric=metric, **cells) for metric in ("logit_diff", "prob", "rank"))
    answer, foil = res.answer_ids[0], res.foil_ids[0]
    source, target = res.source_ids, res.target_ids
    with torch.no_grad():
        _, cache = model.run_with_cache(source)
        for label, hook_name in (("6_pre", "blocks.6.hook_resid_pre"), ("12_mid", "blocks.12.hook_resid_mid"),
                                 ("20_pre", "blocks.20.hook_resid_pre")):
            for pos in (9, 12):
                def patch(act, hook, pos=pos, hook_name=hook_name):
                    act[:, pos] = cache[hook_name][:, pos]
                    return act

                logits = model.run_with_hooks(target, fwd_hooks=[(hook_name, patch)])[0, -1].float()
                r, i = res.labels.index(label), res.positions.index(pos)
                assert abs(float(res.values[0, r, i]) - float(logits[answer] - logits[foil])) < TOL, (label, pos)
                assert abs(float(prob.values[0, r, i]) - float(logits.softmax(-1)[answer])) < 1e-4, (label, pos)
                assert rank.values[0, r, i] == int((logits > logits[answer]).sum()) + 1, (label, pos)
        clean = model(target)[0, -1].float()
    assert abs(float(res.target_values[0]) - float(clean[answer] - clean[foil])) < TOL


def test_a_prompt_set_is_its_pairs_run_one_by_one(smollm2_bridge):
    """Each pair of a set runs its own forwards (of the same shapes), so its grid equals the one-pair sweep
    bit for bit; the bootstrap interval of the set holds its mean."""
    model = smollm2_bridge
    both = sweep(model, SOURCES, TARGETS, answer=ANSWERS, foil=FOILS, layers=["6_pre", "20_pre", -1], resid_mid=False)
    assert both.values.shape == (3, 3, 4)
    for p in range(3):
        one = sweep(model, SOURCES[p], TARGETS[p], answer=ANSWERS[p], foil=FOILS[p], layers=["6_pre", "20_pre", -1],
                    resid_mid=False)
        assert torch.equal(both.values[p], one.values[0]) and both.source_values[p] == one.source_values[0]
    assert (both.source_values > both.target_values).all()  # every source favours the other name
    normalized = both.normalized()
    assert torch.equal(normalized[:, -1, -1], torch.ones(3))  # the final row at the last token restores all
    interval = both.interval(normalized=True, seed=3)
    assert (interval.low <= interval.mean + 1e-6).all() and (interval.mean <= interval.high + 1e-6).all()
    frame = both.to_dataframe()
    assert len(frame) == 3 * 3 * 4 and set(frame["token"]) >= {" Mary", " Anna", " Sarah", " to"}


# --- the bootstrap ---------------------------------------------------------------------------------------


def test_bootstrap_equals_a_direct_percentile_computation():
    values = torch.randn(9, 3, 2, generator=torch.Generator().manual_seed(5))
    ours = bootstrap(values, confidence=0.9, n_resamples=500, seed=11)
    index = torch.randint(9, (500, 9), generator=torch.Generator().manual_seed(11)).numpy()
    means = values.numpy()[index].mean(1)
    np.testing.assert_allclose(ours.low.numpy(), np.percentile(means, 5, axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.high.numpy(), np.percentile(means, 95, axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.mean.numpy(), values.numpy().mean(0), rtol=0, atol=1e-6)
    again = bootstrap(values, confidence=0.9, n_resamples=500, seed=11)
    other = bootstrap(values, confidence=0.9, n_resamples=500, seed=12)
    assert torch.equal(again.low, ours.low) and not torch.equal(other.low, ours.low)


def test_bootstrap_of_two_prompts_spans_them():
    """Two prompts a < b: a resample's mean is a, (a + b) / 2 or b with chances 1/4, 1/2, 1/4, so the 95% interval
    is [a, b] (each end has ~25% of the mass, far beyond 2.5%), and the 40% interval is the midpoint."""
    values = torch.tensor([[1.0], [3.0]])
    wide = bootstrap(values, confidence=0.95, n_resamples=2000, seed=0)
    assert wide.low.item() == 1.0 and wide.high.item() == 3.0
    narrow = bootstrap(values, confidence=0.4, n_resamples=2000, seed=0)
    assert narrow.low.item() == 2.0 and narrow.high.item() == 2.0


# --- figures -------------------------------------------------------------------------------------------


def test_figures_show_the_results_numbers(smollm2_bridge):
    res = sweep(smollm2_bridge, SOURCES[:2], TARGETS[:2], answer=ANSWERS[:2], foil=FOILS[:2], layers=["6_pre", -1],
                resid_mid=False, cone=True)
    grid = res.plot().data[0]
    assert np.allclose(np.array(grid.z, dtype=float), res.mean(normalized=True).numpy())
    assert "CI [" in grid.text[0][1]
    cone = res.plot_cone("6_pre", 9)
    assert np.allclose(np.array(cone.data[0].z, dtype=float), res.cone_change("6_pre", 9).numpy())
    assert list(cone.data[1].y) == ["6_pre"] and "logit lens" in cone.layout.title.text


# --- remote ------------------------------------------------------------------------------------------------


def test_remote_request_runs_where_lens_plugins_cannot_be_imported(tmp_path, smollm2_tokenizer):
    hf = tiny_model("llama")
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    tokens = torch.tensor([[5, 17, 300, 42, 99, 7]] + [[11, 12, 13, 14, 15, 16]] * 5)  # source, target, 4 cells
    cells, positions = ["embed", "1_mid", "1_pre", "2_post"], [1, 3, 5, 5]
    reads = ["embed", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "2_post"]
    backend = SerializeThenRunLocally()
    with model.trace(tokens, backend=backend):
        local = patch_and_measure(model, cells, positions, 5, "prob", 17, None, None, reads)
    embedding = hf.get_input_embeddings().weight
    assert len(backend.blob) < embedding.numel() * embedding.element_size(), "the request must not carry weights"
    served = run_on_server(tmp_path, hf, backend.blob, saved_name="local")
    assert served.keys() == local.keys() == {"format", "metric", "cone"}
    assert served["metric"].shape == (6,) and served["cone"].shape == (6, 7, 6)
    for name in ("metric", "cone"):
        torch.testing.assert_close(served[name], local[name], rtol=0, atol=0)
    assert served["metric"][5] == served["metric"][0]  # the final row at the metric position: the source's


def test_remote_local_simulation_matches_local(smollm2):
    local = sweep(smollm2, layers=["6_pre", -1], resid_mid=False, positions=[9, 13], cone=True)
    simulated = sweep(smollm2, layers=["6_pre", -1], resid_mid=False, positions=[9, 13], cone=True, remote="local")
    for name in ("values", "source_values", "target_values", "cone"):
        assert torch.equal(getattr(simulated, name), getattr(local, name)), name


# --- errors: the same on both backends ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target="When John and Mary went to the store, Mary gave a drink"), ValueError,
     "pair 0 has a 14-token source and a 13-token target"),
    (dict(foil=None), ValueError, "pass foil="),
    (dict(metric="kl"), ValueError, "metric='kl' is not one of"),
    (dict(answer=[" Mary", " John"]), ValueError, "gives 2 tokens for 1 prompt pairs"),
    (dict(answer=" Mary went"), ValueError, "answer: target ' Mary went' is 2 tokens"),
    (dict(metric_position=14), IndexError, "metric_position 14 is out of range"),
    (dict(positions=[14]), IndexError, "position 14 is out of range"),
    (dict(batch_size=0), ValueError, "batch_size must be at least 1"),
    (dict(layers=["3_attn_out"]), KeyError, "no row labelled '3_attn_out'"),
])
def test_bad_input_is_refused_the_same_way(backend, kwargs, error, match, models):
    with pytest.raises(error, match=match) as caught:
        sweep(models[backend], **kwargs)
    assert isinstance(caught.value, lp.LensError)
