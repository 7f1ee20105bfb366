"""The HEM math of hemnet_jax.hem against the paper's equations and independent implementations.

Comparisons run in float64 (jax.enable_x64) unless a test is about float32 behaviour.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hemnet_jax import hem

ETAS = (0.1, 0.5, 0.9, 1.0)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _data(seed=0, lead=(3,), n=40, k=6, c=8, scale=1.0):
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal(lead + (n, c))
    mu = rng.standard_normal(lead + (k, c))
    return jnp.asarray(x), jnp.asarray(mu)


def _softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def test_steps_match_numpy_equations():
    x, mu = _data()
    xn, mun = np.asarray(x), np.asarray(mu)
    tau = math.sqrt(8.0)
    gamma_dot = _softmax(np.einsum("bnc,bkc->bnk", xn, mun) / tau, -1)
    np.testing.assert_allclose(hem.e_step(x, mu, tau), gamma_dot, rtol=1e-12)
    sq = ((xn[:, :, None, :] - mun[:, None, :, :]) ** 2).sum(-1)
    gamma_rbf = _softmax(-sq / tau, -1)
    np.testing.assert_allclose(hem.e_step(x, mu, tau, "rbf"), gamma_rbf, rtol=1e-10)

    n_k = gamma_dot.sum(1)
    f_em = np.einsum("bnk,bnc->bkc", gamma_dot, xn) / (hem.EPS + n_k[..., None])
    np.testing.assert_allclose(hem.m_step(x, jnp.asarray(gamma_dot)), f_em, rtol=1e-12)
    eta = 0.3
    np.testing.assert_allclose(
        hem.n_step(x, jnp.asarray(gamma_dot), mu, eta), (1 - eta) * mun + eta * f_em, rtol=1e-12
    )
    np.testing.assert_allclose(
        hem.r_step(jnp.asarray(gamma_dot), mu), np.einsum("bnk,bkc->bnc", gamma_dot, mun),
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="kernel"):
        hem.e_step(x, mu, tau, "cosine")


def test_leading_axes_broadcast_and_history_shapes():
    x, _ = _data(lead=(2, 3))
    mu0 = _data(seed=1, lead=())[1]  # [K, C] shared by every leading index
    mu, gamma, mus, gammas = hem.unrolled_hem(
        x, mu0, num_iters=4, step_size=0.5, temperature=2.0, return_history=True
    )
    assert mu.shape == (2, 3, 6, 8) and gamma.shape == (2, 3, 40, 6)
    assert mus.shape == (4, 2, 3, 6, 8) and gammas.shape == (4, 2, 3, 40, 6)
    np.testing.assert_array_equal(mus[-1], mu)
    np.testing.assert_array_equal(gammas[-1], gamma)
    # Batched equals one leading index at a time.
    mu_01, _ = hem.unrolled_hem(x[0, 1], mu0, num_iters=4, step_size=0.5, temperature=2.0)
    np.testing.assert_allclose(mu[0, 1], mu_01, rtol=1e-12)


def test_eta_one_is_exactly_plain_em():
    x, mu0 = _data()
    tau = 2.0
    mu = mu0
    for _ in range(3):
        gamma = hem.e_step(x, mu, tau)
        mu = hem.m_step(x, gamma)
    mu_t, gamma_t = hem.unrolled_hem(x, mu0, num_iters=3, step_size=1.0, temperature=tau)
    np.testing.assert_array_equal(mu_t, mu)
    np.testing.assert_array_equal(gamma_t, gamma)


def _emanet_numpy(x_bcn, mu_bck, stage_num):
    """EMANet's EM iteration, transcribed in NumPy with its own layout (x: b*c*n, mu: b*c*k)."""
    for _ in range(stage_num):
        z = np.einsum("bcn,bck->bnk", x_bcn, mu_bck)  # x^T mu, no temperature
        z = _softmax(z, 2)
        z_ = z / (1e-6 + z.sum(axis=1, keepdims=True))
        mu_bck = np.einsum("bcn,bnk->bck", x_bcn, z_)
        mu_bck = mu_bck / (1e-6 + np.linalg.norm(mu_bck, axis=1, keepdims=True))
    return mu_bck, z


def test_emanet_config_matches_independent_numpy():
    x, mu0 = _data(seed=3, n=50, k=5, c=12)
    mu0 = hem.l2_normalize_bases(mu0)
    with jax.enable_x64(False):
        mu_t, gamma_t = hem.unrolled_hem(
            jnp.asarray(x, jnp.float32), jnp.asarray(mu0, jnp.float32), num_iters=3,
            step_size=1.0, temperature=1.0, l2_normalize=True, stop_em_gradient=True,
        )
    ref_mu, ref_z = _emanet_numpy(
        np.swapaxes(np.asarray(x), 1, 2), np.swapaxes(np.asarray(mu0), 1, 2), 3
    )
    np.testing.assert_allclose(mu_t, np.swapaxes(ref_mu, 1, 2), atol=1e-5)
    np.testing.assert_allclose(gamma_t, ref_z, atol=1e-5)


@pytest.mark.parametrize("eta", ETAS)
def test_proposition_1_elbo_never_decreases(eta):
    """Eq. 19: the N-step does not lower L(., gamma^(t+1)); nor does a whole E+N iteration,
    with the rbf E-step at temperature 2 sigma^2 (the exact posterior)."""
    x, mu = _data(seed=11, lead=(4,), n=60, k=5, c=3, scale=2.0)
    sigma2 = 1.5
    elbo_prev = None
    for _ in range(6):
        gamma = hem.e_step(x, mu, 2.0 * sigma2, "rbf")
        before = hem.elbo(x, mu, gamma, sigma2)
        if elbo_prev is not None:  # the E-step alone cannot lower it either
            assert np.all(before >= elbo_prev - 1e-9)
        mu_next = hem.n_step(x, gamma, mu, eta)
        after = hem.elbo(x, mu_next, gamma, sigma2)
        moved = np.asarray(jnp.abs(mu_next - mu).max(axis=(-2, -1)) > 1e-8)
        assert np.all(after >= before - 1e-9)
        assert np.all(after[moved] > before[moved])  # strictly, unless mu is unchanged
        if elbo_prev is not None:
            assert np.all(after >= elbo_prev - 1e-9)
        elbo_prev, mu = after, mu_next


def test_elbo_matches_direct_formula():
    x, mu = _data(seed=5, lead=(2,), n=10, k=4, c=3)
    gamma = hem.e_step(x, mu, 1.0, "rbf")
    sigma2 = 0.7
    xn, mun, g = map(np.asarray, (x, mu, gamma))
    total = np.zeros(2)
    for b in range(2):
        for n in range(10):
            for k in range(4):
                d = xn[b, n] - mun[b, k]
                log_n = -1.5 * np.log(2 * np.pi * sigma2) - d @ d / (2 * sigma2)
                total[b] += g[b, n, k] * (log_n - np.log(g[b, n, k]))
    np.testing.assert_allclose(hem.elbo(x, mu, gamma, sigma2), total, rtol=1e-10)


@pytest.mark.parametrize("eta", (0.2, 0.5, 1.0))
def test_eq15_highway_jacobian(eta):
    """With E-step gradients stopped, d mu^(T) / d mu^(t) = (1 - eta)^(T - t) I."""
    x, mu_t = _data(seed=7, lead=(), n=20, k=3, c=4)
    T, t = 5, 2

    def mu_final(mu):
        return hem.unrolled_hem(
            x, mu, num_iters=T - t, step_size=eta, temperature=2.0, stop_e_step_gradient=True
        )[0]

    jac = jax.jacobian(mu_final)(mu_t).reshape(12, 12)
    np.testing.assert_allclose(jac, (1 - eta) ** (T - t) * np.eye(12), atol=1e-12)
    # Without the stop, the E-step contributes and the Jacobian is not the scaled identity.
    full = jax.jacobian(
        lambda mu: hem.unrolled_hem(x, mu, num_iters=T - t, step_size=eta, temperature=2.0)[0]
    )(mu_t).reshape(12, 12)
    assert np.abs(full - (1 - eta) ** (T - t) * np.eye(12)).max() > 1e-6


@pytest.mark.parametrize("kwargs", [
    dict(kernel="dot", l2_normalize=False),
    dict(kernel="rbf", l2_normalize=True),
])
def test_scan_equals_python_loop_values_and_gradients(kwargs):
    x, mu0 = _data(seed=9, lead=(2,), n=30, k=4, c=5)
    w = jnp.asarray(np.random.default_rng(0).standard_normal((2, 30, 5)))
    common = dict(step_size=0.4, temperature=1.7, **kwargs)

    def loop(x, mu):
        for _ in range(4):
            mu, gamma = hem.hem_iteration(x, mu, **common)
        return mu, gamma

    def loss(fn, x, mu):
        mu_t, gamma_t = fn(x, mu)
        return jnp.sum(w * hem.r_step(gamma_t, mu_t)) + jnp.sum(mu_t**2)

    def scan(x, mu):
        return hem.unrolled_hem(x, mu, num_iters=4, **common)

    for a, b in zip(scan(x, mu0), loop(x, mu0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    g_scan = jax.grad(lambda x, mu: loss(scan, x, mu), argnums=(0, 1))(x, mu0)
    g_loop = jax.grad(lambda x, mu: loss(loop, x, mu), argnums=(0, 1))(x, mu0)
    for a, b in zip(g_scan, g_loop, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # Rematerialised iterations give the same gradients.
    g_remat = jax.grad(
        lambda x, mu: loss(lambda x, m: hem.unrolled_hem(x, m, num_iters=4, remat=True, **common),
                           x, mu), argnums=(0, 1))(x, mu0)
    for a, b in zip(g_remat, g_scan, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_stop_em_gradient_cuts_every_path():
    x, mu0 = _data(seed=2)

    def loss(x, mu0, stop):
        mu, gamma = hem.unrolled_hem(
            x, mu0, num_iters=3, step_size=0.5, temperature=2.0, stop_em_gradient=stop
        )
        return jnp.sum(hem.r_step(gamma, mu) ** 2)

    gx, gmu = jax.grad(loss, argnums=(0, 1))(x, mu0, True)
    assert not np.any(gx) and not np.any(gmu)
    gx, gmu = jax.grad(loss, argnums=(0, 1))(x, mu0, False)
    assert np.abs(gx).max() > 1e-3 and np.abs(gmu).max() > 1e-6


def test_bfloat16_inputs_stay_close_and_finite():
    x, mu0 = _data(seed=4, n=64, k=8, c=16)
    with jax.enable_x64(False):
        x32, mu32 = jnp.asarray(x, jnp.float32), jnp.asarray(mu0, jnp.float32)
        ref = hem.unrolled_hem(x32, mu32, num_iters=3, step_size=0.5, temperature=4.0)[0]
        got = hem.unrolled_hem(
            x32.astype(jnp.bfloat16), mu32.astype(jnp.bfloat16), num_iters=3, step_size=0.5,
            temperature=4.0,
        )[0]
    assert got.dtype == jnp.float32  # the EM math accumulates in float32
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref, atol=5e-2, rtol=5e-2)


def test_num_iters_must_be_positive():
    x, mu0 = _data()
    with pytest.raises(ValueError, match="num_iters"):
        hem.unrolled_hem(x, mu0, num_iters=0, step_size=0.5, temperature=1.0)


def test_layer_offsets_split_the_input_gradient():
    """Zero offsets leave values unchanged; their gradients add up to the gradient w.r.t. X."""
    x, mu0 = _data(seed=12, lead=(2,), n=25, k=4, c=6)
    T = 3
    zeros = jnp.zeros((T,) + x.shape)
    common = dict(num_iters=T, step_size=0.5, temperature=2.0)

    def loss(x, offsets):
        mu, gamma = hem.unrolled_hem(x, mu0, layer_offsets=offsets, **common)
        return jnp.sum(jnp.sin(hem.r_step(gamma, mu)))

    np.testing.assert_array_equal(
        hem.unrolled_hem(x, mu0, layer_offsets=(zeros, zeros), **common)[0],
        hem.unrolled_hem(x, mu0, **common)[0],
    )
    g_x = jax.grad(loss)(x, None)
    g_e, g_n = jax.grad(loss, argnums=1)(x, (zeros, zeros))
    # The R-step reads X only through mu_T and gamma_T, so every path is some layer's E or N copy.
    np.testing.assert_allclose(g_e.sum(0) + g_n.sum(0), g_x, rtol=1e-10, atol=1e-13)
    assert np.abs(g_n).max() > 1e-3 and np.abs(g_e).max() > 0
