"""Jump to conclusions: the early-exit curve and the per-row scores against loop-by-loop references, the
least-squares fit's normal equations, and on the real model: the shortcut beats the identity at predicting the
model's own top-1 from the middle of the stack, the same on both backends."""

import pytest
import torch
from synthetic_results import lens_result
from tiny_models import random_tokens, tiny_model

import lens_plugins as lp
from lens_plugins.methods.early_exit import early_exit, fit_shortcuts, shortcut_scores


def reference_exit(result, threshold, criterion):
    """Token by token: walk up the rows, exit at the first confident one (the last row always exits)."""
    rows, batch, n_pos = result.log_partition.shape
    hits, saved, n = 0, 0.0, 0
    n_layers = rows - 1  # synthetic rows: embed, 1_pre .. (rows-2)_pre, (rows-2)_post -> hidden index = row index
    for b in range(batch):
        for p in range(n_pos):
            if not result.attention_mask[b, result.positions[p]]:
                continue
            for r in range(rows):
                prob = float(result.top_logprobs[r, b, p, 0].exp())
                ent = float(result.entropy[r, b, p])
                if r == rows - 1 or (prob >= threshold if criterion == "prob" else ent <= threshold):
                    break
            hits += int(result.top_ids[r, b, p, 0] == result.final_top1[b, p])
            saved += (n_layers - r) / n_layers
            n += 1
    return hits / n, saved / n


@pytest.mark.parametrize("criterion", ["prob", "entropy"])
def test_early_exit_matches_a_token_by_token_reference(criterion):
    result = lens_result(batch=3, rows=8, seq=6, seed=2)
    result.attention_mask[2, :3] = 0
    thresholds = [0.0, 0.3, 0.5, 0.7, 0.9, 1.01] if criterion == "prob" else [3.0, 2.0, 1.5, 1.0, 0.5, -1.0]
    curve = early_exit(result, thresholds, criterion=criterion)
    assert curve.tokens == 15 and curve.n_layers == 7
    for i, t in enumerate(thresholds):
        retention, saved = reference_exit(result, t, criterion)
        assert curve.retention[i].item() == pytest.approx(retention, abs=1e-6), t
        assert curve.layers_saved[i].item() == pytest.approx(saved, abs=1e-6), t
    # Never confident: every token runs the whole model, agreeing with itself.
    assert curve.retention[-1] == 1 and curve.layers_saved[-1] == 0 and curve.exit_layer[-1] == 7
    if criterion == "prob":  # always confident: every token exits at the embedding row
        assert curve.layers_saved[0] == 1 and curve.exit_layer[0] == 0
    best = curve.layers_saved_at(0.95)
    ok = [s for r, s in zip(curve.retention.tolist(), curve.layers_saved.tolist()) if r >= 0.95]
    assert best == max(ok)
    figure = curve.plot()
    assert list(figure.data[0].y) == curve.retention.tolist()


def test_shortcut_scores_are_the_results_own_agreement_and_surprisal():
    a, b = lens_result(batch=2, rows=5, seq=4, seed=0), lens_result(batch=2, rows=5, seq=4, seed=0)
    b.top_ids = b.top_ids.roll(1, dims=0)  # another lens: each row's top-k is the row below's
    scores = shortcut_scores({"identity": a, "other": b})
    for i, result in enumerate((a, b)):
        agree = (result.top_ids[..., 0] == result.final_top1).float().mean((1, 2))
        torch.testing.assert_close(scores.precision_at_1[i], agree)
        torch.testing.assert_close(scores.surprisal[i], -result.final_top1_logprob.mean((1, 2)))
    assert scores.precision_at_1[0, -1] == 1
    assert scores.to_dataframe().shape == (10, 4)
    with pytest.raises(lp.LensError, match="same prompts"):
        shortcut_scores({"a": a, "c": lens_result(batch=2, rows=5, seq=4, seed=1)})


def test_sublayer_rows_are_refused():
    result = lens_result(batch=1, rows=4, seq=3)
    result.labels = ["embed", "1_attn_out", "2_pre", "2_post"]
    with pytest.raises(lp.LensError, match="residual rows"):
        early_exit(result)
    with pytest.raises(lp.LensError, match="criterion"):
        early_exit(lens_result(), criterion="margin")


def test_the_fit_solves_the_normal_equations_on_a_tiny_model():
    from lens_plugins.backends.hf import residual_stack

    hf = tiny_model("llama")
    blocks = random_tokens(batch=6, seq=32)
    lens = fit_shortcuts(hf, blocks, max_blocks=6, ridge=0.0)
    stack = residual_stack(hf, blocks).float().reshape(4, -1, 64)
    rms = stack.pow(2).mean(-1, keepdim=True).sqrt()
    for i in range(3):
        x = torch.cat([stack[i], torch.ones(len(stack[i]), 1)], -1).double()
        target = (stack[-1] / rms[-1] * rms[i]).double()
        residual = lens.transform_hidden(stack[i], i).double() - target
        gradient = x.T @ residual  # zero at the least-squares solution
        assert gradient.abs().max() < 1e-3 * (x.T @ target).abs().max(), i
        assert residual.pow(2).sum() < (stack[i].double() - target).pow(2).sum()  # better than the identity


@pytest.mark.slow
def test_shortcut_beats_identity_in_the_middle_on_both_backends(smollm2_hf, smollm2_bridge):
    from lens_plugins.backends import nnsight as lpn
    from lens_plugins.training import loop as train

    docs = train.builtin_corpus()
    lens = fit_shortcuts(smollm2_hf[0], train.token_blocks(docs[:20], smollm2_hf[1], 64)[:12], max_blocks=12)
    held = [" ".join(doc.split())[:160] for doc in docs[60:62]]  # documents the fit never saw
    kwargs = dict(layers=[12, 15, 18, -1], top_k=1, reductions=["top_k", "entropy", "final_top1"],
                  padding_side="left")
    nn_model = lpn.wrap_model(*smollm2_hf)
    results = {"identity": lpn.run_logit_lens(nn_model, held, **kwargs),
               "shortcut": lpn.run_logit_lens(nn_model, held, lens=lens, **kwargs)}
    scores = shortcut_scores(results)
    # Din et al.: from the middle of the stack the linear map is far less surprised by the model's own top-1
    # than the row read as it is (benchmarks/early_exit.py measured 6-7 nats against 13-15 at these rows; with
    # this few fit tokens its precision@1 is not reliably better, so that is not asserted).
    assert (scores.surprisal[1, :3] < scores.surprisal[0, :3]).all(), scores.to_dataframe()
    tl = lp.transformer_lens.run_logit_lens(smollm2_bridge, held, lens=lens, **kwargs)
    a, b = early_exit(results["shortcut"]), early_exit(tl)
    torch.testing.assert_close(a.retention, b.retention, atol=1 / a.tokens + 1e-6, rtol=0)
    torch.testing.assert_close(a.layers_saved, b.layers_saved, atol=1 / a.tokens + 1e-6, rtol=0)
