"""The jitted train step: 8 simulated devices equal 1 device on the same global batch."""

import jax
import numpy as np
import pytest

from hemnet_jax import optim, parallel, trainer
from hemnet_jax.models import create_model
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    model = create_model(config.model, num_classes=5)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        image = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
        label = rng.integers(0, 5, (8, 32, 32)).astype(np.int32)
        label[:, :4] = 255
        batches.append({"image": image, "label": label})
    return config, model, batches


def _run(config, model, batches, devices):
    mesh = parallel.create_mesh(devices)
    params = jax.eval_shape(
        trainer._initializer(model, optim.optax.identity()), jax.random.PRNGKey(0)
    ).params
    tx, schedule = optim.make_optimizer(config.train, params)
    state = trainer.init_state(config, model, tx, mesh)
    initial_bases = jax.device_get(state.bases)
    step = trainer.make_train_step(model, tx, schedule, config, mesh)
    key = jax.device_put(jax.random.PRNGKey(1), parallel.replicated(mesh))
    history = []
    for batch in batches:
        state, m = step(state, parallel.global_batch(batch, mesh), key)
        history.append(jax.device_get(m))
    return initial_bases, jax.device_get(state), history


def test_eight_devices_equal_one(setup):
    config, model, batches = setup
    init, state1, hist1 = _run(config, model, batches, jax.devices()[:1])
    _, state8, hist8 = _run(config, model, batches, jax.devices())
    for m1, m8 in zip(hist1, hist8, strict=True):
        for k in m1:
            np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, err_msg=k)
    assert hist1[-1]["loss"] < hist1[0]["loss"] * 1.5  # sane, finite
    assert int(state8.step) == 3
    for name in ("params", "batch_stats", "bases", "opt_state"):
        leaves1 = jax.tree.leaves(getattr(state1, name))
        leaves8 = jax.tree.leaves(getattr(state8, name))
        assert leaves1, name
        # float32 sums in another order: momentum buffers (sums of raw gradients) see ~1e-4.
        rtol = 1e-3 if name == "opt_state" else 1e-4
        for a, b in zip(leaves1, leaves8, strict=True):
            np.testing.assert_allclose(b, a, rtol=rtol, atol=1e-5, err_msg=name)
    # The bases moved (the update ran with the state the 8 devices share).
    moved = [
        np.abs(a - b).max()
        for a, b in zip(jax.tree.leaves(state1.bases), jax.tree.leaves(init), strict=True)
    ]
    assert min(moved) > 1e-4
