import numpy as np
import pytest
from scipy import stats

from mergemix import metrics, similarity, subsets


def _brute(target, union):
    cos = np.array([[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in union] for x in target])
    l2 = np.array([[np.linalg.norm(x - y) for y in union] for x in target])
    return {
        "avg_max_cos": cos.max(1).mean(),
        "avg_min_l2": l2.min(1).mean(),
        "avg_avg_cos": cos.mean(1).mean(),
        "avg_avg_l2": l2.mean(1).mean(),
        "max_max_cos": cos.max(),
        "min_min_l2": l2.min(),
    }


def test_six_metrics_match_brute_force_on_every_subset():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(13, 5))
    cands = {n: rng.normal(loc=i, size=(7 + 3 * i, 5)) for i, n in enumerate(["a", "b", "c", "d"])}
    subs = subsets.all_subsets(sorted(cands))
    got = similarity.score_subsets(target, cands, subs)
    for i, s in enumerate(subs):
        ref = _brute(target, np.concatenate([cands[n] for n in s]))
        for m in similarity.METRICS:
            assert got[m][i] == pytest.approx(ref[m], rel=1e-9, abs=1e-9), (m, s)


def test_pearson_matches_scipy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=40), rng.normal(size=40)
    y = y + 0.5 * x
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert np.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))


def test_paper_correlation_excludes_single_dataset_subsets():
    rng = np.random.default_rng(2)
    sizes = np.array([1, 1, 1, 2, 2, 2, 3])
    merged = rng.uniform(0.2, 0.9, size=7)
    mixture = rng.uniform(0.2, 0.9, size=7)
    base = 0.4
    r_acc, r_logit, n = metrics.merged_vs_mixture_pearson(sizes, merged, mixture, base, 1e-4)
    keep = sizes >= 2
    assert n == 4
    assert r_acc == pytest.approx(stats.pearsonr(merged[keep], mixture[keep])[0], abs=1e-12)
    lm = np.log(merged[keep] / (1 - merged[keep])) - np.log(base / (1 - base))
    lf = np.log(mixture[keep] / (1 - mixture[keep])) - np.log(base / (1 - base))
    assert r_logit == pytest.approx(stats.pearsonr(lm, lf)[0], abs=1e-12)


def test_logit_is_finite_at_zero_and_one():
    v = metrics.logit([0.0, 0.5, 1.0], 1e-4)
    assert np.all(np.isfinite(v)) and v[1] == 0 and v[0] == pytest.approx(-v[2])
    assert v[2] == pytest.approx(np.log((1 - 1e-4) / 1e-4))  # clipped at the given eps


def test_the_configured_logit_eps_reaches_every_logit_pearson():
    """analysis.logit_eps is the clipping of every logit-delta Pearson: with accuracies of 0 and 1
    among the points, another eps gives another r (once a constant default silently won)."""
    sizes = [2, 2, 2, 3]
    merged, mixture = [0.0, 0.6, 0.7, 1.0], [0.1, 0.62, 0.9, 0.95]
    r = {eps: metrics.merged_vs_mixture_pearson(sizes, merged, mixture, 0.5, eps)[1] for eps in (1e-4, 1e-2)}
    assert abs(r[1e-4] - r[1e-2]) > 0.01
