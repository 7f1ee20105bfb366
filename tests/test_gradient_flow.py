"""Gradient-flow study (issue 7, Fig. 3): per-layer shares of dL/dX, eq. 18, the model, the CLI.

Array-level tests run in float64 (jax.enable_x64); the model-level ones in float32.
"""

import csv
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hemnet_jax import hem
from hemnet_jax.data import datasets
from hemnet_jax.models import create_model
from hemnet_jax.studies import gradient_flow as gf
from hemnet_jax.training import checkpointing, losses, optim
from hemnet_jax.training.state import TrainState
from tests.tiny import tiny_config
from tests.tiny_model import init_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _data(seed=0, lead=(2,), n=30, k=4, c=5):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(lead + (n, c))), jnp.asarray(rng.standard_normal((k, c)))


def _loss(shape, seed=1):
    """L = sum(W * X_tilde) + 0.5 ||X_tilde||^2 with random W: dL/dX_tilde = W + X_tilde."""
    w = np.random.default_rng(seed).standard_normal(shape)
    return w, lambda xt: jnp.sum(w * xt) + 0.5 * jnp.sum(jnp.square(xt))


def _plain_grad(x, mu0, loss_fn, **kw):
    def loss(x):
        mu, gamma = hem.unrolled_hem(x, mu0, **kw)
        return loss_fn(hem.r_step(gamma, mu))

    return jax.grad(loss)(x)


@pytest.mark.parametrize("kernel,l2_normalize", [("dot", False), ("rbf", False), ("dot", True)])
def test_layer_shares_sum_to_the_plain_gradient(x64, kernel, l2_normalize):
    x, mu0 = _data()
    _, loss_fn = _loss(x.shape)
    kw = dict(num_iters=4, step_size=0.4, temperature=2.0, kernel=kernel, l2_normalize=l2_normalize)
    plain = _plain_grad(x, mu0, loss_fn, **kw)
    g = gf.layer_input_gradients(x, mu0, loss_fn, **kw)
    assert g.e_step.shape == g.n_step.shape == (4,) + x.shape
    tol = dict(rtol=1e-10, atol=1e-10 * float(jnp.abs(plain).max()))
    np.testing.assert_allclose(g.e_step.sum(0) + g.n_step.sum(0), plain, **tol)
    np.testing.assert_allclose(g.x, plain, **tol)
    out = gf.summarize(g, 0.4, gf.elbo_sigma2(2.0, kernel))
    np.testing.assert_allclose(out["total"], jnp.mean(jnp.abs(plain)), rtol=1e-12)
    # Every layer's E-step and N-step really share the gradient (nothing is trivially zero).
    assert np.all(out["n_step"] > 1e-4) and np.all(out["e_step"] > 1e-6)


@pytest.mark.parametrize("eta", [0.2, 0.5, 0.8])
def test_stopped_e_step_n_step_shares_are_eq18(x64, eta):
    """With gamma constant, layer t's N-step share of dL/dx_n is exactly eq. 18's term:
    sum_k (1 - eta)^(T - t) dL/dmu_k^(T) eta gamma_nk^(t) / N_k^(t), computed here in numpy."""
    x, mu0 = _data(seed=2)
    w, loss_fn = _loss(x.shape, seed=3)
    T = 4
    g = gf.layer_input_gradients(
        x, mu0, loss_fn, num_iters=T, step_size=eta, temperature=2.0, stop_e_step_gradient=True
    )
    assert not np.any(g.e_step)
    mu_t, gamma_t = np.asarray(g.mu[-1]), np.asarray(g.gamma[-1])
    d_mu_t = np.einsum("bnk,bnc->bkc", gamma_t, w + gamma_t @ mu_t)  # dL/dmu^(T), gamma fixed
    for t in range(1, T + 1):
        gamma = np.asarray(g.gamma[t - 1])
        n_k = gamma.sum(-2, keepdims=True)  # [B, 1, K]
        expected = (1 - eta) ** (T - t) * eta * (gamma / (hem.EPS + n_k)) @ d_mu_t
        np.testing.assert_allclose(g.n_step[t - 1], expected, rtol=1e-10, atol=1e-14)
    # The responsibilities differ per layer here, so only the factor, not the profile, is exact.
    assert np.abs(np.asarray(g.gamma[0]) - gamma_t).max() > 1e-3


def _saturated_clusters(n=24, k=4, c=6, scale=40.0, seed=4):
    """Well-separated clusters: logit gaps ~scale^2 make every E-step exactly one-hot in
    float64, with the same assignment in every layer."""
    rng = np.random.default_rng(seed)
    centres = scale * np.eye(k, c)
    x = centres[np.arange(n) % k] + rng.standard_normal((n, c))
    return jnp.asarray(x), jnp.asarray(centres + rng.standard_normal((k, c)))


@pytest.mark.parametrize("eta", [0.1, 0.4, 0.8, 1.0])
def test_n_step_profile_is_eq18_when_gamma_is_fixed_across_layers(x64, eta, default_cpu_emitters):
    x, mu0 = _saturated_clusters()
    _, loss_fn = _loss(x.shape)
    kw = dict(num_iters=5, step_size=eta, temperature=1.0)
    g = gf.layer_input_gradients(x, mu0, loss_fn, stop_e_step_gradient=True, **kw)
    assert np.all((g.gamma == 0) | (g.gamma == 1)) and np.all(g.gamma == g.gamma[0])
    out = gf.summarize(g, eta, gf.elbo_sigma2(1.0, "dot"))
    weights = gf.eq18_weights(5, eta)
    np.testing.assert_allclose(out["n_step"], out["predicted"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(out["n_step"] / out["n_step"][-1], weights / weights[-1], rtol=1e-12)
    # The paper's vanishing E-step: through a saturated softmax no gradient flows at all, so
    # the unstopped network gives the same N-step shares and exactly zero E-step shares.
    free = gf.per_layer_input_gradients(x, mu0, loss_fn, **kw)
    assert not np.any(free["e_step"])
    np.testing.assert_allclose(free["n_step"], out["n_step"], rtol=1e-12)


def test_eta_one_with_stopped_e_step_feeds_only_the_last_n_step(x64):
    x, mu0 = _data(seed=5)
    _, loss_fn = _loss(x.shape)
    kw = dict(num_iters=4, step_size=1.0, temperature=2.0)
    stopped = gf.per_layer_input_gradients(x, mu0, loss_fn, stop_e_step_gradient=True, **kw)
    assert np.all(stopped["n_step"][:-1] == 0) and stopped["n_step"][-1] > 1e-3
    assert np.all(stopped["e_step"] == 0)
    np.testing.assert_array_equal(stopped["predicted"][:-1], 0)
    # Control: unstopped, the earlier N-steps reach the loss through the later E-steps.
    free = gf.per_layer_input_gradients(x, mu0, loss_fn, **kw)
    assert np.all(free["n_step"][:-1] > 1e-6)


def test_elbo_per_iteration_rises_with_the_exact_e_step(x64):
    """rbf at temperature 2 sigma2 is the exact posterior and each N-step raises the ELBO
    (Proposition 1): L(mu^(t), gamma^(t)) never decreases."""
    x, mu0 = _data(seed=6, n=60)
    _, loss_fn = _loss(x.shape)
    for eta in (0.3, 1.0):
        out = gf.per_layer_input_gradients(
            x, mu0, loss_fn, num_iters=6, step_size=eta, temperature=3.0, kernel="rbf"
        )
        assert np.all(np.diff(out["elbo"]) > -1e-9), (eta, out["elbo"])
    # The last one is eq. 3 of the last iteration's (mu, gamma) with sigma2 = temperature / 2.
    mu, gamma = hem.unrolled_hem(x, mu0, num_iters=6, step_size=1.0, temperature=3.0, kernel="rbf")
    np.testing.assert_allclose(out["elbo"][-1], jnp.mean(hem.elbo(x, mu, gamma, 1.5)), rtol=1e-12)


def test_elbo_sigma2_makes_the_dot_e_step_the_posterior(x64):
    """For bases of one norm, the dot E-step at tau is the rbf E-step at 2 * elbo_sigma2."""
    x, mu = _data(seed=7)
    mu = mu / jnp.linalg.norm(mu, axis=-1, keepdims=True)
    tau = 1.7
    np.testing.assert_allclose(
        hem.e_step(x, mu, tau, "dot"), hem.e_step(x, mu, 2 * gf.elbo_sigma2(tau, "dot"), "rbf"),
        rtol=1e-12,
    )
    assert gf.elbo_sigma2(tau, "rbf") == tau / 2


def test_stop_em_gradient_also_stops_the_layer_offsets(x64):
    x, mu0 = _data(seed=8)
    zeros = jnp.zeros((3,) + x.shape)

    def loss(offsets):
        mu, gamma = hem.unrolled_hem(x, mu0, num_iters=3, step_size=0.5, temperature=2.0,
                                     stop_em_gradient=True, layer_offsets=offsets)
        return jnp.sum(jnp.sin(hem.r_step(gamma, mu)))

    g_e, g_n = jax.grad(loss)((zeros, zeros))
    assert not np.any(g_e) and not np.any(g_n)


# ---------------------------------------------------------------------------------------------
# The HEM unit inside the full (tiny) network.


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    model = create_model(config.model, datasets.get_dataset_info(config.data.name).num_classes)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
    labels = rng.integers(0, 5, (2, 32, 32)).astype(np.int32)
    labels[:, :3] = 255
    variables = init_variables(model, seed=1)  # the init other files compile: no compile here
    return config, model, variables, images, jnp.asarray(labels)


def test_model_layer_shares_sum_to_the_gradient_wrt_the_hem_input(tiny):
    """X = conv_in(x) + bias feeds only the HEM layers, so dL/dbias = sum over pixels of dL/dX,
    which must equal the sum of the 2T per-layer shares (an independent jax.grad)."""
    _, model, variables, images, labels = tiny
    key = jax.random.PRNGKey(3)

    def loss(params):
        outputs, _ = model.apply(
            {**variables, "params": params}, images, train=True, rngs={"dropout": key},
            mutable=["batch_stats", "bases"],
        )
        return losses.cross_entropy(outputs["logits"], labels)

    d_bias = jax.jit(jax.grad(loss))(variables["params"])["hem"]["conv_in"]["bias"]
    g = jax.jit(lambda v, i, lab: gf.model_layer_input_gradients(model, v, i, lab, rng=key))(
        variables, images, labels
    )
    T, (b, n, c) = model.hem.num_iters, g.features.shape
    assert g.e_step.shape == g.n_step.shape == (T, b, n, c) and g.gamma.shape[:-1] == (T, b, n)
    shares = (g.e_step + g.n_step).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(shares, d_bias, rtol=1e-4, atol=1e-5 * float(jnp.abs(d_bias).max()))
    assert float(jnp.abs(d_bias).max()) > 0


def test_layer_gradient_metrics_for_the_training_hook(tiny):
    _, model, variables, images, labels = tiny
    batch = {"image": images, "label": labels}
    metrics = jax.jit(functools.partial(gf.layer_gradient_metrics, model))(variables, batch)
    T = model.hem.num_iters
    names = {"grad_flow/total"} | {
        f"grad_flow/{k}_t{t}" for k in ("n_step", "e_step", "elbo") for t in range(1, T + 1)
    }
    assert set(metrics) == names
    assert all(m.shape == () and np.isfinite(m) for m in metrics.values())
    assert all(metrics[f"grad_flow/n_step_t{t}"] > 0 for t in range(1, T + 1))
    assert metrics["grad_flow/total"] >= max(metrics[f"grad_flow/n_step_t{t}"] for t in (1, T)) / T


# ---------------------------------------------------------------------------------------------
# The program.


def test_cli_writes_tables_and_plots_from_a_checkpoint(tmp_path, tiny_data_dir, tiny):
    config, model, variables, _, _ = tiny
    tx, _ = optim.make_optimizer(config.train, variables["params"])
    state = TrainState.create(variables, tx.init(variables["params"]))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(3, state.replace(step=jnp.asarray(3, jnp.int32)), checkpointing.run_metadata(config),
              force=True)
    ckpt.close()

    cmd = [
        sys.executable, "-m", "hemnet_jax.studies.gradient_flow", "--config=tests/tiny.py",
        f"--workdir={tmp_path}", f"--config.data.data_dir={tiny_data_dir}",
        "--config.study.num_images=8", "--config.study.batch_size=8",
        "--config.study.step_sizes=(0.5,1.0)",
    ]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out_dir = tmp_path / "gradient_flow" / "step_3"
    assert "N-step |g|" in run.stdout and str(out_dir / "gradient_flow.png") in run.stdout

    with open(out_dir / "gradient_flow.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["eta"]), int(r["layer"])) for r in rows] == [
        (0.5, 1), (0.5, 2), (1.0, 1), (1.0, 2)
    ]
    assert all(float(r["n_step_grad"]) > 0 and float(r["total_grad"]) > 0 for r in rows)
    assert float(rows[2]["predicted_n_step_grad"]) == 0  # eq. 18 at eta = 1: last layer only
    meta = json.loads((out_dir / "gradient_flow.json").read_text())
    assert meta["step"] == 3 and meta["num_images"] == 8 and len(meta["results"]) == 2
    assert np.isclose(meta["results"][0]["n_step"][0], float(rows[0]["n_step_grad"]))
    png = (out_dir / "gradient_flow.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
