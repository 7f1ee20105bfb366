"""HEMUnit: layout, bases state, T_eval, sharding over 8 simulated devices, gradient paths."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hemnet_jax import HEMUnit, hem
from hemnet_jax.models.hem_unit import init_bases

B, H, W, C, K = 8, 5, 4, 16, 6


def _unit(**kw):
    defaults = dict(num_bases=K, num_iters=3, step_size=0.5)
    return HEMUnit(**{**defaults, **kw})


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.PRNGKey(0), (B, H, W, C))


@pytest.fixture(scope="module")
def variables(x):
    return _unit().init(jax.random.PRNGKey(1), x, train=False)


def test_collections_and_initial_bases(variables, x):
    assert set(variables) == {"params", "batch_stats", "bases"}
    mu0 = variables["bases"]["mu"]
    assert mu0.shape == (K, C) and "mu" not in variables["params"]
    np.testing.assert_allclose(np.linalg.norm(mu0, axis=-1), 1.0, rtol=1e-5)
    # init_bases draws Normal(0, sqrt(2/K)) and normalises each basis over C.
    key = jax.random.PRNGKey(3)
    draw = np.asarray(jax.random.normal(key, (K, C)))
    np.testing.assert_allclose(
        init_bases(key, K, C), draw / np.linalg.norm(draw, axis=-1, keepdims=True), rtol=1e-5
    )
    assert variables["params"]["conv_in"]["bias"].shape == (C,)
    assert "bias" not in variables["params"]["conv_out"]
    y = _unit().apply(variables, x, train=False)
    assert y.shape == x.shape and bool(jnp.all(y >= 0))


def test_forward_is_the_documented_layout(variables, x):
    """An independent re-composition of the unit from hem.* and plain jnp, at evaluation."""
    p, s = variables["params"], variables["batch_stats"]["bn_out"]
    feats = x @ p["conv_in"]["kernel"][0, 0] + p["conv_in"]["bias"]
    mu, gamma = hem.unrolled_hem(
        feats.reshape(B, H * W, C), variables["bases"]["mu"], num_iters=3, step_size=0.5,
        temperature=math.sqrt(C),
    )
    z = jax.nn.relu(hem.r_step(gamma, mu)).reshape(B, H, W, C) @ p["conv_out"]["kernel"][0, 0]
    z = (z - s["mean"]) / jnp.sqrt(s["var"] + 1e-5) * p["bn_out"]["scale"] + p["bn_out"]["bias"]
    expected = jax.nn.relu(z + x)
    np.testing.assert_allclose(_unit().apply(variables, x, train=False), expected, atol=1e-5)


def test_bases_move_only_in_training_by_the_formula(variables, x):
    unit = _unit()
    _, upd = unit.apply(
        variables, x, train=True, mutable=["bases", "batch_stats", "intermediates"]
    )
    mu_t = upd["intermediates"]["mu"][0][-1]  # [B, K, C] after the last iteration
    expected = 0.9 * variables["bases"]["mu"] + 0.1 * mu_t.mean(axis=0)
    np.testing.assert_allclose(upd["bases"]["mu"], expected, rtol=1e-6, atol=1e-7)
    assert np.abs(upd["bases"]["mu"] - variables["bases"]["mu"]).max() > 1e-4

    _, upd_eval = unit.apply(variables, x, train=False, mutable=["bases", "batch_stats"])
    np.testing.assert_array_equal(upd_eval["bases"]["mu"], variables["bases"]["mu"])
    for a, b in zip(jax.tree.leaves(upd_eval["batch_stats"]),
                    jax.tree.leaves(variables["batch_stats"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_eval_num_iters_override(variables, x):
    y6, inter = _unit().apply(
        variables, x, train=False, num_iters=6, mutable=["intermediates"]
    )
    assert inter["intermediates"]["gamma"][0].shape == (6, B, H, W, K)
    assert inter["intermediates"]["mu"][0].shape == (6, B, K, C)
    np.testing.assert_allclose(y6, _unit(num_iters=6).apply(variables, x, train=False), rtol=1e-6)
    assert np.abs(y6 - _unit().apply(variables, x, train=False)).max() > 1e-5


def test_intermediates_are_the_hem_history(variables, x):
    _, inter = _unit().apply(variables, x, train=False, mutable=["intermediates"])
    gamma = inter["intermediates"]["gamma"][0]
    np.testing.assert_allclose(gamma.sum(-1), 1.0, rtol=1e-5)
    x_tilde = inter["intermediates"]["x_tilde"][0]
    mu_t = inter["intermediates"]["mu"][0][-1]
    np.testing.assert_allclose(
        x_tilde, jnp.einsum("bhwk,bkc->bhwc", gamma[-1], mu_t), rtol=1e-5, atol=1e-6
    )


@functools.partial(jax.jit, static_argnums=0)
def _train_apply(unit, variables, x):
    return unit.apply(variables, x, train=True, mutable=["bases", "batch_stats"])


def test_sharded_batch_matches_single_device(variables, x):
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    unit = _unit()
    y1, upd1 = _train_apply(unit, variables, x)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    vs = jax.device_put(variables, NamedSharding(mesh, P()))
    y8, upd8 = _train_apply(unit, vs, xs)
    assert len(xs.sharding.device_set) == 8 and y8.sharding.spec[0] == "data"
    np.testing.assert_allclose(y8, y1, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(upd8), jax.tree.leaves(upd1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The update used the global batch: with only the first device's share, it differs.
    _, upd_shard0 = _train_apply(unit, variables, x[:1])
    assert np.abs(upd_shard0["bases"]["mu"] - upd1["bases"]["mu"]).max() > 1e-4


@pytest.mark.parametrize("stop", [False, True])
def test_input_gradient_paths(variables, x, stop):
    unit = _unit(stop_em_gradient=stop)
    r = jax.random.normal(jax.random.PRNGKey(5), x.shape)

    def loss(params, x):
        y, _ = unit.apply({**variables, "params": params}, x, train=True,
                          mutable=["bases", "batch_stats"])
        return jnp.sum(r * y), y

    (_, y), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x
    )
    identity_only = r * (y > 0)  # d relu(f + x) / dx with f constant in x
    conv_in_grad = np.abs(g_params["conv_in"]["kernel"]).max()
    if stop:
        np.testing.assert_allclose(g_x, identity_only, rtol=1e-6, atol=1e-7)
        assert conv_in_grad == 0.0
    else:
        assert np.abs(g_x - identity_only).max() > 1e-3
        assert conv_in_grad > 1e-4
