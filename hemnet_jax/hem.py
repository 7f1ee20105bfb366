"""Highway Expectation Maximization (HEM) as pure functions on arrays.

Notation follows the HEMNet paper (Song, Kim, Shim, AAAI 2021), sections 3-4:
  x:     [..., N, C]  features, one row per pixel (N = H * W)
  mu:    [..., K, C]  Gaussian bases (means of an isotropic GMM without mixing weights)
  gamma: [..., N, K]  responsibilities (attention maps), rows sum to one over K
  mask:  [..., N]     optional validity of each row of x (True: a real pixel). Masked-out rows
                      (padding) take no part in the M-step's sums, so the bases are those of the
                      valid rows alone; their gamma is 0.

Every function is batched over any leading axes ("...") that x, mu and gamma share (or broadcast).
Nothing here holds state: the Flax wiring lives in `hemnet_jax.models.hem_unit`.

Precision: softmax, normalisers and the ELBO are computed in at least float32 (float64 stays
float64); results come back in the promoted input dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

Kernel = Literal["dot", "rbf"]

# Guards N_k = sum_n gamma_nk (M-step) and ||mu|| (L2 normalisation), as EMANet's code does.
EPS = 1e-6


def _accum_dtype(*arrays: jax.Array) -> jnp.dtype:
    """The dtype reductions run in: the inputs' common dtype, at least float32."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def e_step(x: jax.Array, mu: jax.Array, temperature: float, kernel: Kernel = "dot") -> jax.Array:
    """E-step: responsibilities gamma = p(z_n = k | x_n, mu).

    kernel="dot": gamma = softmax_K(x mu^T / temperature)             (eq. 8)
    kernel="rbf": gamma = softmax_K(-||x_n - mu_k||^2 / temperature)  (eq. 7)

    For "rbf" the term ||x_n||^2 is constant over K and cancels in the softmax, so the logits are
    computed as (2 x_n.mu_k - ||mu_k||^2) / temperature: the same gamma, one matmul.
    With temperature = 2 sigma^2 the rbf E-step is the exact posterior of N(x | mu_k, sigma^2 I).

    Args:
      x: [..., N, C]. mu: [..., K, C]. temperature: sigma^2 of the paper (sqrt(C) there).
    Returns:
      gamma: [..., N, K], each row sums to one.
    """
    dot = jnp.einsum("...nc,...kc->...nk", x, mu)
    if kernel == "dot":
        logits = dot
    elif kernel == "rbf":
        sq_norm_mu = jnp.sum(jnp.square(mu), axis=-1)[..., None, :]
        logits = 2.0 * dot - sq_norm_mu
    else:
        raise ValueError(f"Unknown E-step kernel {kernel!r}: expected 'dot' or 'rbf'.")
    logits = logits.astype(_accum_dtype(logits)) / temperature
    return jax.nn.softmax(logits, axis=-1).astype(dot.dtype)


def mask_responsibilities(gamma: jax.Array, mask: jax.Array | None) -> jax.Array:
    """gamma [..., N, K] with the rows of masked-out positions (mask [..., N] False) set to 0."""
    if mask is None:
        return gamma
    return jnp.where(mask[..., None], gamma, jnp.zeros((), gamma.dtype))


def m_step(x: jax.Array, gamma: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """M-step of plain EM: F_EM(mu, X)_k = (1 / N_k) sum_n gamma_nk x_n   (eq. 5 / eq. 9).

    N_k = sum_n gamma_nk is guarded by EPS (empty bases stay finite), as in EMANet's code.
    With a mask, both sums run over the valid positions only.

    Args:
      x: [..., N, C]. gamma: [..., N, K]. mask: [..., N] bool, or None (every position).
    Returns:
      mu: [..., K, C].
    """
    dtype = _accum_dtype(x, gamma)
    gamma = mask_responsibilities(gamma, mask)
    n_k = jnp.sum(gamma.astype(dtype), axis=-2)  # [..., K]
    gamma_bar = gamma.astype(dtype) / (EPS + n_k[..., None, :])  # eq. 9's normalised gamma
    return jnp.einsum("...nk,...nc->...kc", gamma_bar, x.astype(dtype))


def n_step(
    x: jax.Array, gamma: jax.Array, mu: jax.Array, step_size: float, mask: jax.Array | None = None
) -> jax.Array:
    """N-step (Newton-Raphson step on Q), eq. 13: mu <- (1 - eta) mu + eta F_EM(mu, X).

    step_size = eta in (0, 1]; eta = 1 recovers the M-step exactly.

    Args:
      x: [..., N, C]. gamma: [..., N, K]. mu: [..., K, C]. mask: [..., N] bool or None.
    Returns:
      mu: [..., K, C].
    """
    f_em = m_step(x, gamma, mask)
    return (1.0 - step_size) * mu.astype(f_em.dtype) + step_size * f_em


def r_step(gamma: jax.Array, mu: jax.Array) -> jax.Array:
    """R-step, eq. 10: X_tilde = gamma mu.

    Args:
      gamma: [..., N, K]. mu: [..., K, C].
    Returns:
      x_tilde: [..., N, C].
    """
    return jnp.einsum("...nk,...kc->...nc", gamma, mu)


def l2_normalize_bases(mu: jax.Array) -> jax.Array:
    """mu_k / (EPS + ||mu_k||) over C, EMANet's normalisation of the bases. mu: [..., K, C]."""
    return mu / (EPS + jnp.linalg.norm(mu, axis=-1, keepdims=True))


def hem_iteration(
    x: jax.Array,
    mu: jax.Array,
    *,
    step_size: float,
    temperature: float,
    kernel: Kernel = "dot",
    l2_normalize: bool = False,
    stop_e_step_gradient: bool = False,
    x_n: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One HEM layer (Fig. 2): E-step with mu^(t), then N-step.

    Args:
      x: [..., N, C]. mu: [..., K, C] = mu^(t).
      stop_e_step_gradient: treat gamma as a constant in the backward pass (the approximation
        of eq. 15 and 18: only the N-step's paths carry gradient).
      x_n: the N-step's own copy of x (default: x). Equal in value; a separate input so that
        gradients reaching X through this layer's E-step and N-step can be told apart (eq. 17).
      mask: [..., N] bool, or None: positions that take part in the M-step (see the module
        docstring); gamma is 0 on the others.
    Returns:
      (mu^(t+1) [..., K, C], gamma^(t+1) [..., N, K]).
    """
    gamma = mask_responsibilities(e_step(x, mu, temperature, kernel), mask)
    if stop_e_step_gradient:
        gamma = jax.lax.stop_gradient(gamma)
    mu = n_step(x if x_n is None else x_n, gamma, mu, step_size, mask)
    if l2_normalize:
        mu = l2_normalize_bases(mu)
    return mu, gamma


def unrolled_hem(
    x: jax.Array,
    mu0: jax.Array,
    *,
    num_iters: int,
    step_size: float,
    temperature: float,
    kernel: Kernel = "dot",
    l2_normalize: bool = False,
    stop_em_gradient: bool = False,
    return_history: bool = False,
    stop_e_step_gradient: bool = False,
    remat: bool = False,
    layer_offsets: tuple[jax.Array, jax.Array] | None = None,
    mask: jax.Array | None = None,
):
    """T unrolled HEM iterations (E-step then N-step), eq. 13-14, with `jax.lax.scan`.

    Args:
      x: [..., N, C] features. mu0: [..., K, C] initial bases (broadcast against x's leading axes).
      num_iters: T, static.
      step_size: eta; 1.0 is plain unrolled EM.
      temperature: sigma^2 of eq. 7/8.
      kernel: "dot" (eq. 8) or "rbf" (eq. 7).
      l2_normalize: normalise each basis over C after every N-step (EMANet).
      stop_em_gradient: the whole loop is gradient-free (EMANet's torch.no_grad()).
      return_history: also return every iteration's bases and responsibilities.
      stop_e_step_gradient: gamma is a constant for the backward pass in every iteration, so
        gradients flow through the N-step's highway and F_EM's x only (eq. 15, 18).
      remat: recompute each iteration in the backward pass (jax.checkpoint) instead of
        storing its intermediates: less memory, one more E-step of compute per iteration.
      layer_offsets: (e_offsets, n_offsets), each [T, ..., N, C]: layer t's E-step reads
        x + e_offsets[t] and its N-step x + n_offsets[t]. With zeros, the values are unchanged
        and the gradients w.r.t. the offsets are the per-layer contributions to the gradient
        w.r.t. X, which sum to it (eq. 16-17).
      mask: [..., N] bool, or None: only these positions enter the M-step's sums, so a padded
        input with its mask gives the bases of the unpadded input (gamma is 0 on padding).
    Returns:
      (mu_T [..., K, C], gamma_T [..., N, K]); with return_history also
      mu_history [T, ..., K, C] and gamma_history [T, ..., N, K], entry t after iteration t + 1.
      gamma_T is the last E-step's output (computed from mu^(T-1)), as the R-step uses it.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}.")
    if stop_em_gradient:  # the offsets too: their gradients are X's, which is zero here
        x, mu0, layer_offsets = jax.lax.stop_gradient((x, mu0, layer_offsets))
    dtype = _accum_dtype(x, mu0)
    lead = jnp.broadcast_shapes(x.shape[:-2], mu0.shape[:-2])
    mu = jnp.broadcast_to(mu0, lead + mu0.shape[-2:]).astype(dtype)

    step = functools.partial(
        hem_iteration,
        step_size=step_size,
        temperature=temperature,
        kernel=kernel,
        l2_normalize=l2_normalize,
        stop_e_step_gradient=stop_e_step_gradient,
        mask=mask,
    )
    if remat:
        step = jax.checkpoint(step)

    def body(carry, offsets):
        mu, _ = carry
        if offsets is None:
            mu, gamma = step(x, mu)
        else:
            mu, gamma = step(x + offsets[0], mu, x_n=x + offsets[1])
        return (mu, gamma), ((mu, gamma) if return_history else None)

    gamma0 = jnp.zeros(lead + (x.shape[-2], mu0.shape[-2]), dtype)
    (mu, gamma), history = jax.lax.scan(body, (mu, gamma0), layer_offsets, length=num_iters)
    if return_history:
        return mu, gamma, history[0], history[1]
    return mu, gamma


def elbo(x: jax.Array, mu: jax.Array, gamma: jax.Array, sigma2: float) -> jax.Array:
    """ELBO of an isotropic GMM without mixing weights, eq. 3.

    L(mu, gamma) = sum_n sum_k gamma_nk [ln N(x_n | mu_k, sigma2 I) - ln gamma_nk],
    ln N(x | mu, sigma2 I) = -C/2 ln(2 pi sigma2) - ||x - mu||^2 / (2 sigma2)  (constant included),
    with 0 ln 0 = 0. The rbf E-step with temperature = 2 sigma2 maximises it over gamma.

    Args:
      x: [..., N, C]. mu: [..., K, C]. gamma: [..., N, K]. sigma2: the Gaussians' variance.
    Returns:
      [...]: one value per leading index.
    """
    dtype = _accum_dtype(x, mu, gamma)
    x, mu, gamma = x.astype(dtype), mu.astype(dtype), gamma.astype(dtype)
    c = x.shape[-1]
    sq_dist = (
        jnp.sum(jnp.square(x), -1)[..., :, None]
        - 2.0 * jnp.einsum("...nc,...kc->...nk", x, mu)
        + jnp.sum(jnp.square(mu), -1)[..., None, :]
    )
    log_gauss = -0.5 * c * math.log(2.0 * math.pi * sigma2) - sq_dist / (2.0 * sigma2)
    return jnp.sum(gamma * log_gauss - jax.scipy.special.xlogy(gamma, gamma), axis=(-2, -1))
