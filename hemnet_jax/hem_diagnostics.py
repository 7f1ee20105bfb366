"""Diagnostics of the HEM bases and attention: are the K bases distinct, and are they used?

Pure functions on arrays (numpy / jax.numpy; no Flax). Notation as in `hemnet_jax.hem`:
  mu:    [..., K, C]  bases (e.g. the moving-averaged mu0 [K, C], or mu^(T) [B, K, C])
  gamma: [..., N, K]  responsibilities (attention maps), rows sum to one over K

What they measure (docs/diagnostics.md says which values mean collapse):
- `distinct_bases`: clusters of bases whose cosine similarity exceeds a threshold (connected
  components of the graph "cos(mu_i, mu_j) > threshold"). With the dot-product E-step, bases of
  one direction give attention maps that differ only through their norms; a cluster of
  near-equal bases gives identical attention maps.
- `effective_bases_in_use`: exp(H(m)), m_k = the mean attention mass of basis k over pixels (and
  batch). K when mass is uniform over the bases, 1 when one basis takes all of it.
- `effective_bases_distinguishing`: exp(I(pixel; basis)) = exp(H(m) - mean_n H(gamma_n)). K when
  every pixel picks one basis and the bases are used evenly; 1 when every pixel has the same
  attention (e.g. K identical bases give gamma = 1/K everywhere, whose `in_use` number is K).
- `norm_stats`: mean and standard deviation of the bases' L2 norms ||mu_k||.
- `distinct_attention`: clusters of bases whose attention maps correlate above a threshold:
  the collapse as a picture shows it (identical maps), whatever the bases' norms.
- `select_bases`: K' well-used bases whose attention maps differ, for pictures (Fig. 4).

`attention_stats` is the jit-friendly reduction (sums over pixels, accumulable over batches);
`summarize` turns bases and those sums into the scalars that training logs and eval prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

# Cosine similarity above which two bases count as one (angle below ~18 degrees). Independent
# random directions in C dimensions have cosine ~ N(0, 1/C): 0.95 is > 5 standard deviations for
# C >= 32 (the demo's C), so distinct bases are never merged by chance; collapsed bases in the
# runs of docs/diagnostics.md sit above 0.999.
COSINE_THRESHOLD = 0.95
# Pearson correlation of two attention maps above which `select_bases` calls them duplicates.
CORRELATION_THRESHOLD = 0.95
# A basis with less than this share of the total attention mass is not "in use" for pictures.
MIN_MASS_SHARE = 1e-3


def cosine_similarity(mu: np.ndarray) -> np.ndarray:
    """[K, C] -> [K, K] cosine similarity of the bases (a zero basis has similarity 0)."""
    mu = np.asarray(mu, np.float64)
    norms = np.linalg.norm(mu, axis=-1)
    unit = mu / np.where(norms > 0, norms, 1.0)[:, None]
    return unit @ unit.T


def cluster_labels(similarity: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components of the graph with an edge i - j where similarity[i, j] > threshold.

    Args:
      similarity: [K, K], symmetric.
    Returns:
      int [K]: the cluster of each item, numbered 0, 1, ... in order of first appearance.
    """
    k = similarity.shape[0]
    adjacent = np.asarray(similarity) > threshold
    labels = np.full(k, -1, np.int64)
    count = 0
    for start in range(k):
        if labels[start] >= 0:
            continue
        labels[start], stack = count, [start]
        while stack:
            i = stack.pop()
            for j in np.flatnonzero(adjacent[i] & (labels < 0)):
                labels[j] = count
                stack.append(j)
        count += 1
    return labels


def distinct_bases(mu: np.ndarray, threshold: float = COSINE_THRESHOLD) -> np.ndarray:
    """Cluster labels [K] of the bases mu [K, C] by cosine similarity > threshold.

    The number of distinct bases is `labels.max() + 1`; K means no two bases coincide.
    """
    mu = np.asarray(mu)
    if mu.ndim != 2:
        raise ValueError(f"distinct_bases expects mu [K, C], got shape {mu.shape}.")
    return cluster_labels(cosine_similarity(mu), threshold)


def norm_stats(mu: np.ndarray) -> tuple[float, float]:
    """(mean, std) over all bases (and leading axes) of ||mu_k||_2. mu: [..., K, C]."""
    norms = np.linalg.norm(np.asarray(mu, np.float64), axis=-1)
    return float(norms.mean()), float(norms.std())


def attention_stats(gamma, weights=None) -> dict:
    """Sums over pixels that the attention diagnostics need; jit-friendly, add them over batches.

    Args:
      gamma: [..., N, K] responsibilities.
      weights: optional [..., N], 1 for pixels to count, 0 for padding.
    Returns:
      {"mass": [K] sum_n w_n gamma_nk, "cross": [K, K] sum_n w_n gamma_nk gamma_nl,
       "entropy": sum_n w_n H(gamma_n) (nats), "pixels": sum_n w_n}, in at least float32.
    """
    dtype = jnp.promote_types(jnp.result_type(gamma), jnp.float32)
    gamma = jnp.asarray(gamma).astype(dtype)
    k = gamma.shape[-1]
    weights = (jnp.ones(gamma.shape[:-1], dtype) if weights is None
               else jnp.broadcast_to(jnp.asarray(weights, dtype), gamma.shape[:-1]))
    plogp = jnp.where(gamma > 0, gamma * jnp.log(jnp.where(gamma > 0, gamma, 1.0)), 0.0)
    flat, w = gamma.reshape(-1, k), weights.reshape(-1)
    return {
        "mass": w @ flat,
        "cross": (flat * w[:, None]).T @ flat,
        "entropy": -jnp.sum(jnp.sum(plogp, axis=-1) * weights),
        "pixels": jnp.sum(weights),
    }


def _entropy(p: np.ndarray) -> float:
    p = np.asarray(p, np.float64)
    p = p / p.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def effective_bases_in_use(mass: np.ndarray) -> float:
    """exp(entropy) of the attention mass per basis, mass [K] (any positive scale): in [1, K]."""
    return float(np.exp(_entropy(mass)))


def effective_bases_distinguishing(stats: Mapping[str, np.ndarray]) -> float:
    """exp(H(mean gamma) - mean H(gamma_n)) = exp(I(pixel; basis)), in [1, K].

    stats: `attention_stats`' output (possibly summed over batches).
    """
    mean_entropy = float(stats["entropy"]) / float(stats["pixels"])
    return float(np.exp(max(_entropy(stats["mass"]) - mean_entropy, 0.0)))


def summarize(mu: np.ndarray | None = None, stats: Mapping[str, np.ndarray] | None = None, *,
              threshold: float = COSINE_THRESHOLD) -> dict[str, float]:
    """The scalars logged in training and printed by eval.

    Args:
      mu: bases [K, C] (e.g. the moving-averaged mu0).
      stats: `attention_stats`' output (summed over the batches seen).
    Returns:
      From mu: "num_bases" (K), "distinct_bases" (count of cosine clusters), "largest_cluster"
      (bases in the biggest one), "norm_mean", "norm_std". From stats: "effective_in_use",
      "effective_distinguishing", "distinct_attention" (count of clusters of attention maps
      correlating above `CORRELATION_THRESHOLD`).
    """
    out: dict[str, float] = {}
    if mu is not None:
        labels = distinct_bases(np.asarray(mu), threshold)
        out["num_bases"] = float(len(labels))
        out["distinct_bases"] = float(labels.max() + 1)
        out["largest_cluster"] = float(np.bincount(labels).max())
        out["norm_mean"], out["norm_std"] = norm_stats(mu)
    if stats is not None:
        out["effective_in_use"] = effective_bases_in_use(np.asarray(stats["mass"]))
        out["effective_distinguishing"] = effective_bases_distinguishing(stats)
        labels = cluster_labels(correlation(stats), CORRELATION_THRESHOLD)
        out["distinct_attention"] = float(labels.max() + 1)
    return out


@dataclasses.dataclass(frozen=True)
class Selection:
    """Bases chosen for pictures.

    indices: the chosen bases, most attention mass first. requested: how many were asked for.
    available: how many well-used bases with distinct attention maps exist (<= K).
    """

    indices: list[int]
    requested: int
    available: int

    @property
    def short(self) -> bool:
        """True when fewer distinct, well-used bases exist than were asked for."""
        return len(self.indices) < self.requested


# A map whose variance over pixels is below this fraction of its mean square is "constant".
CONSTANT_MAP = 1e-6


def correlation(stats: Mapping[str, np.ndarray]) -> np.ndarray:
    """Pearson correlation [K, K] of the bases' attention maps over all pixels counted, from
    `attention_stats` sums (computed in float64 on the host).

    A constant map (variance below CONSTANT_MAP of its mean square: e.g. every pixel attends
    1/K to every basis) correlates 1 with another constant map and 0 with any other.
    """
    n = float(stats["pixels"])
    mean = np.asarray(stats["mass"], np.float64) / n
    second = np.asarray(stats["cross"], np.float64) / n
    cov = second - np.outer(mean, mean)
    var = np.diag(cov).copy()
    constant = var <= CONSTANT_MAP * np.maximum(np.diag(second), 1e-300)
    std = np.sqrt(np.where(constant, 1.0, var))
    corr = np.clip(cov / np.outer(std, std), -1.0, 1.0)
    corr[constant, :] = 0.0
    corr[:, constant] = 0.0
    corr[np.ix_(constant, constant)] = 1.0
    return corr


def map_correlation(gamma, weights=None) -> np.ndarray:
    """[K, K] Pearson correlation of the attention maps of gamma [..., N, K] (every leading axis
    is part of the map), see `correlation`."""
    return correlation(attention_stats(gamma, weights))


def distinct_attention(gamma, threshold: float = CORRELATION_THRESHOLD) -> np.ndarray:
    """Cluster labels [K] of the bases by correlation of their attention maps > threshold.

    gamma: [..., N, K]. `labels.max() + 1` is the number of distinct attention maps.
    """
    return cluster_labels(map_correlation(gamma), threshold)


def select_bases(gamma: np.ndarray, count: int, *,
                 max_correlation: float = CORRELATION_THRESHOLD,
                 min_mass_share: float = MIN_MASS_SHARE) -> Selection:
    """Up to `count` bases with the most attention mass whose maps are not duplicates.

    Greedy: bases in decreasing order of mass; one is taken unless its attention map correlates
    above `max_correlation` with one already taken, or its mass share is below `min_mass_share`.

    Args:
      gamma: [..., N, K] (e.g. [h, w, K] of one image at the last iteration; every leading axis
        is part of the map).
    """
    g = np.asarray(gamma, np.float64)
    mass = g.reshape(-1, g.shape[-1]).sum(axis=0)
    share = mass / max(mass.sum(), 1e-300)
    corr = map_correlation(g)
    taken: list[int] = []
    for k in np.argsort(-mass, kind="stable"):
        if share[k] < min_mass_share:
            break
        if all(corr[k, j] <= max_correlation for j in taken):
            taken.append(int(k))
    return Selection(indices=taken[:count], requested=count, available=len(taken))
