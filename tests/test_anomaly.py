"""Anomaly detection from lens trajectories: the features are the result's own reductions averaged over real
positions, the detectors are scikit-learn's and separate a planted shift, AUROC is the pair count, and both
backends give the same features on the real model."""

import pytest
import torch
from synthetic_results import lens_result

import lens_plugins as lp
from lens_plugins.methods.anomaly import (
    REDUCTIONS,
    AnomalyDetector,
    TrajectoryFeatures,
    auroc,
    trajectory_features,
)

pytest.importorskip("sklearn")


def test_features_are_masked_means_of_the_reductions():
    result = lens_result(batch=3, rows=6, seq=5, seed=1)
    result.attention_mask[1, :2] = 0  # left padding on prompt 1: its first two positions count for nothing
    feats = trajectory_features(result)
    rows = result.labels
    assert feats.names[:5] == [f"kl_final_row[{r}]" for r in rows[:-1]]  # the final row's KL (0) is left out
    assert feats.names[5:11] == [f"entropy[{r}]" for r in rows]
    assert feats.names[11:] == [f"top1_agreement[{r}]" for r in rows[:-1]]
    agree = (result.top_ids[..., 0] == result.final_top1).float()
    for b in range(3):
        real = [p for p in range(5) if result.attention_mask[b, p]]
        for r in range(5):
            kl = sum(float(result.kl_final_row[r, b, p]) for p in real) / len(real)
            share = sum(float(agree[r, b, p]) for p in real) / len(real)
            assert feats.values[b, r].item() == pytest.approx(kl, rel=1e-5)
            assert feats.values[b, 11 + r].item() == pytest.approx(share, rel=1e-6)
        ent = sum(float(result.entropy[-1, b, p]) for p in real) / len(real)
        assert feats.values[b, 10].item() == pytest.approx(ent, rel=1e-5)


def test_missing_reductions_and_empty_prompts_are_refused():
    result = lens_result(batch=2, rows=4, seq=3)
    result.attention_mask[0] = 0
    with pytest.raises(lp.LensError, match="no real token"):
        trajectory_features(result)
    result = lens_result(batch=2, rows=4, seq=3)
    result.kl_final_row = None
    with pytest.raises(lp.LensError, match="kl_final_row"):
        trajectory_features(result)


def test_auroc_is_the_share_of_correctly_ordered_pairs():
    normal, anomalous = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.9, 0.35, 0.6])
    pairs = [(1.0 if a > n else 0.5 if a == n else 0.0) for a in anomalous.tolist() for n in normal.tolist()]
    assert auroc(normal, anomalous) == pytest.approx(sum(pairs) / len(pairs))
    assert auroc(torch.zeros(3), torch.ones(2)) == 1.0 and auroc(torch.ones(3), torch.zeros(2)) == 0.0


def features(values):
    return TrajectoryFeatures(names=[f"f{i}" for i in range(values.shape[1])], values=values)


@pytest.mark.parametrize("method", ["isolation_forest", "local_outlier_factor"])
def test_detectors_find_a_planted_shift_and_not_a_resample(method):
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.1, 10, 8)  # features on very different scales: the detector standardises them
    normal = lambda n: torch.randn(n, 8, generator=g) * scale
    detector = AnomalyDetector(method).fit(features(normal(300)))
    held, resample = detector.score(features(normal(200))), detector.score(features(normal(200)))
    shifted = normal(200)
    shifted[:, 0] += 0.5  # 5 standard deviations on the smallest-scale feature only
    assert auroc(held, detector.score(features(shifted))) > 0.95
    assert 0.4 < auroc(held, resample) < 0.6
    again = AnomalyDetector(method).fit(features(torch.cat([normal(300)])))
    assert again.method == method and torch.equal(detector.score(features(shifted)), detector.score(features(shifted)))


def test_detector_errors():
    with pytest.raises(lp.LensError, match="unknown detector"):
        AnomalyDetector("one_class_svm")
    with pytest.raises(lp.LensError, match="not fitted"):
        AnomalyDetector().score(features(torch.zeros(3, 2)))
    detector = AnomalyDetector().fit(features(torch.randn(10, 2)))
    with pytest.raises(lp.LensError, match="do not match"):
        detector.score(TrajectoryFeatures(names=["g0", "g1"], values=torch.zeros(2, 2)))


@pytest.mark.slow
def test_real_model_features_agree_across_backends_and_lenses(smollm2_hf, smollm2_bridge):
    from lens_plugins.backends import nnsight as lpn

    prompts = ["The capital of France is Paris, and", "def f(x): return x + 1  # add"]
    kwargs = dict(layers=[0, 10, 20, -1], positions=[-3, -2, -1], top_k=1, reductions=list(REDUCTIONS),
                  padding_side="left")
    tl = trajectory_features(lp.transformer_lens.run_logit_lens(smollm2_bridge, prompts, **kwargs))
    nn = trajectory_features(lpn.run_logit_lens(lpn.wrap_model(*smollm2_hf), prompts, **kwargs))
    assert tl.names == nn.names and len(tl.names) == 3 + 4 + 3
    torch.testing.assert_close(tl.values, nn.values, atol=2e-3, rtol=1e-3)
    # A lens that zeroes every row but the last (h + h @ -I = 0) decodes them as uniform: entropy ln V exactly,
    # KL(final || uniform) = ln V - H(final), no top-1 agreement but by ties; the final row is untouched.
    labels = ["embed", "10_pre", "20_pre", "29_post"]
    weight = torch.zeros(4, 576, 576)
    weight[:3] = -torch.eye(576)
    zeroed = trajectory_features(lpn.run_logit_lens(lpn.wrap_model(*smollm2_hf), prompts,
                                                    lens=lp.AffineLens(labels, weight), **kwargs)).values
    log_v = torch.tensor(49152.0).log()
    final_entropy = nn.values[:, 6]
    torch.testing.assert_close(zeroed[:, 3:6], log_v.expand(2, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(zeroed[:, 6], final_entropy, atol=1e-4, rtol=0)
    torch.testing.assert_close(zeroed[:, :3], (log_v - final_entropy)[:, None].expand(2, 3), atol=1e-3, rtol=0)
