"""hemnet_jax.hem_diagnostics against planted bases and attention, and NumPy references written
here from the definitions (entropy, cosine, Pearson correlation)."""

import math

import numpy as np
import pytest

from hemnet_jax import hem
from hemnet_jax import hem_diagnostics as diag

K, C = 16, 32


def _distinct_mu(seed=0):
    """K orthogonal directions with norms from 0.5 to 3: pairwise cosine 0."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((C, K)))
    return q.T * np.linspace(0.5, 3.0, K)[:, None]


def _collapsed_mu(seed=0):
    """15 bases along one direction (tiny noise), one elsewhere: the demo's collapse."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(C)
    mu = v + 1e-3 * rng.standard_normal((K, C))
    mu[7] = rng.standard_normal(C)
    return mu


def _entropy(p):
    p = p / p.sum()
    return -sum(q * math.log(q) for q in p if q > 0)


def test_planted_collapsed_set_reads_as_collapsed_and_distinct_set_does_not():
    collapsed = diag.summarize(_collapsed_mu())
    assert collapsed["distinct_bases"] == 2 and collapsed["largest_cluster"] == 15
    distinct = diag.summarize(_distinct_mu())
    assert distinct["distinct_bases"] == K and distinct["largest_cluster"] == 1
    # Random Gaussian bases at C = 32 (cosine ~ N(0, 1/32)) are never merged.
    for seed in range(5):
        mu = np.random.default_rng(seed).standard_normal((64, C))
        assert diag.summarize(mu)["distinct_bases"] == 64


def test_clusters_follow_the_threshold_and_are_transitive():
    def pair(cos):  # two unit vectors at the given cosine, plus a far third
        return np.array([[1.0, 0, 0], [cos, math.sqrt(1 - cos**2), 0], [0, 0, 1.0]])

    assert list(diag.distinct_bases(pair(0.96))) == [0, 0, 1]
    assert list(diag.distinct_bases(pair(0.90))) == [0, 1, 2]
    assert list(diag.distinct_bases(pair(0.90), threshold=0.8)) == [0, 0, 1]
    # a chain 0-1-2 at 15 degrees per link: 0 and 2 are 30 degrees apart, one cluster
    angles = np.radians([0.0, 15.0, 30.0, 90.0])
    chain = np.stack([np.cos(angles), np.sin(angles)], 1)
    np.testing.assert_allclose(diag.cosine_similarity(chain)[0, 2], math.cos(math.radians(30)))
    assert list(diag.distinct_bases(chain)) == [0, 0, 0, 1]
    # scale does not matter, a zero basis is its own cluster
    assert list(diag.distinct_bases(np.array([[1.0, 1.0], [5.0, 5.0], [0.0, 0.0]]))) == [0, 0, 1]


def test_norm_stats_match_numpy():
    mu = np.random.default_rng(1).standard_normal((2, K, C))
    norms = np.sqrt((mu**2).sum(-1))
    mean, std = diag.norm_stats(mu)
    assert mean == pytest.approx(norms.mean(), rel=1e-12)
    assert std == pytest.approx(norms.std(), rel=1e-12)


def test_effective_numbers_at_the_extremes():
    n = 50
    uniform = np.full((3, n, K), 1.0 / K)
    s = diag.summarize(stats=diag.attention_stats(uniform))
    assert s["effective_in_use"] == pytest.approx(K, rel=1e-5)
    assert s["effective_distinguishing"] == pytest.approx(1.0, rel=1e-5)

    one_hot_one = np.zeros((3, n, K))
    one_hot_one[..., 4] = 1.0
    s = diag.summarize(stats=diag.attention_stats(one_hot_one))
    assert s["effective_in_use"] == pytest.approx(1.0, rel=1e-6)
    assert s["effective_distinguishing"] == pytest.approx(1.0, rel=1e-6)

    one_hot_even = np.eye(K)[np.arange(3 * 4 * K) % K].reshape(3, 4 * K, K)
    s = diag.summarize(stats=diag.attention_stats(one_hot_even))
    assert s["effective_in_use"] == pytest.approx(K, rel=1e-5)
    assert s["effective_distinguishing"] == pytest.approx(K, rel=1e-5)


def test_effective_numbers_match_a_numpy_reference_and_ignore_padding():
    rng = np.random.default_rng(2)
    logits = 2.0 * rng.standard_normal((2, 30, K))
    gamma = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    mean_mass = gamma.reshape(-1, K).mean(0)
    pixel_entropy = np.mean([_entropy(g) for g in gamma.reshape(-1, K)])
    s = diag.summarize(stats=diag.attention_stats(gamma))
    assert s["effective_in_use"] == pytest.approx(math.exp(_entropy(mean_mass)), rel=1e-5)
    assert s["effective_distinguishing"] == pytest.approx(
        math.exp(_entropy(mean_mass) - pixel_entropy), rel=1e-4)
    # padded pixels (weight 0) do not count, whatever their attention; stats add over batches
    padded = np.concatenate([gamma, np.eye(K)[np.zeros((2, 9), int)]], axis=1)
    weights = np.concatenate([np.ones((2, 30)), np.zeros((2, 9))], axis=1)
    halves = [diag.attention_stats(padded[i:i + 1], weights[i:i + 1]) for i in range(2)]
    summed = {key: halves[0][key] + halves[1][key] for key in halves[0]}
    assert diag.summarize(stats=summed) == pytest.approx(s, rel=1e-5)


def test_collapsed_bases_give_one_distinguishing_basis_through_the_e_step():
    x = np.random.default_rng(3).standard_normal((1, 200, C))
    for mu, low, high in [(np.tile(_collapsed_mu()[:1], (K, 1)), 1.0, 1.0 + 1e-4),
                          (_distinct_mu() * 10.0, 4.0, K)]:
        gamma = np.asarray(hem.e_step(x, mu[None], math.sqrt(C)))
        s = diag.summarize(stats=diag.attention_stats(gamma))
        assert low <= s["effective_distinguishing"] <= high


def test_select_bases_skips_duplicates_and_says_when_fewer_exist():
    yy, xx = np.mgrid[:12, :12]
    small = [(yy < 3) & (xx < 3), (yy >= 9) & (xx >= 9)]  # two 3x3 objects
    background = ~(small[0] | small[1])
    logits = np.zeros((12, 12, K))
    for k in range(K):  # 13 copies of the background (bases 0..12), the two objects, a dead basis
        logits[..., k] = 6.0 * (background if k < 13 else small[min(k - 13, 1)])
    logits[..., 15] = -30.0
    gamma = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    # copies of blob 0 hold the most mass each: plain top-3 by mass would pick three copies
    assert set(np.argsort(-gamma.sum((0, 1)))[:3]) <= set(range(13))
    sel = diag.select_bases(gamma, 3)
    assert len(sel.indices) == 3 and not sel.short and sel.available == 3
    assert sel.indices[0] in range(13) and set(sel.indices[1:]) == {13, 14}
    corr = np.corrcoef(gamma.reshape(-1, K).T[sel.indices])
    assert np.all(corr[~np.eye(3, dtype=bool)] < 0.95)
    sel = diag.select_bases(gamma, 5)
    assert sel.short and len(sel.indices) == 3 and sel.available == 3 and sel.requested == 5
    # all bases identical (constant maps): one basis
    sel = diag.select_bases(np.full((12, 12, K), 1.0 / K), 3)
    assert len(sel.indices) == 1 and sel.short


def test_distinct_attention_counts_identical_maps_and_matches_numpy_correlation():
    rng = np.random.default_rng(4)
    maps = rng.random((2, 40, 5))
    maps[..., 3] = 2.0 * maps[..., 0] + 0.1  # perfectly correlated with map 0
    maps[..., 4] = 0.25  # constant
    corr = np.asarray(diag.map_correlation(maps))
    reference = np.corrcoef(maps.reshape(-1, 5)[:, :4].T)
    np.testing.assert_allclose(corr[:4, :4], reference, atol=1e-5)
    assert corr[4, 4] == 1.0 and np.all(corr[4, :4] == 0.0)
    assert list(diag.distinct_attention(maps)) == [0, 1, 2, 0, 3]
    # sums over batches give the correlation over all their pixels; padding (weight 0) is ignored
    padded = np.concatenate([maps, rng.random((2, 7, 5))], axis=1)
    weights = np.concatenate([np.ones((2, 40)), np.zeros((2, 7))], axis=1)
    parts = [diag.attention_stats(padded[i], weights[i]) for i in range(2)]
    summed = {key: parts[0][key] + parts[1][key] for key in parts[0]}
    np.testing.assert_allclose(diag.correlation(summed), corr, atol=1e-5)
