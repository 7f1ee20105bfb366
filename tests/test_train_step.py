"""The jitted train step: 8 simulated devices equal 1 device on the same global batch."""

import jax
import numpy as np
import pytest

from hemnet_jax.models import create_model
from hemnet_jax.training import sharding
from hemnet_jax.training.state import init_state, optimizer_for
from hemnet_jax.training.train_step import make_train_step
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    # Dropout off here: with Dropout2d on this tiny network (16 head channels), the backward is
    # so ill-conditioned that float32 rounding alone moves some gradients by percents; dropout's
    # mask under sharding is checked on its own below.
    config.model.dropout = 0.0
    model = create_model(config.model, num_classes=5)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        image = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
        label = rng.integers(0, 5, (8, 32, 32)).astype(np.int32)
        label[:, :4] = 255
        batches.append({"image": image, "label": label})
    return config, model, batches


def _stepper(config, model, devices):
    """(initial state, step(state, numpy batch) -> (state, metrics)) on a mesh of `devices`."""
    mesh = sharding.create_mesh(devices)
    tx, schedule = optimizer_for(config, model)
    state = init_state(config, model, tx, mesh)
    train_step = make_train_step(model, tx, schedule, config, mesh)
    key = jax.device_put(jax.random.PRNGKey(1), sharding.replicated(mesh))
    shardings = jax.tree.map(lambda a: a.sharding, state)

    def step(host_state, batch):
        state = jax.device_put(host_state, shardings)
        new_state, metrics = train_step(state, sharding.global_batch(batch, mesh), key)
        return jax.device_get(new_state), jax.device_get(metrics)

    return jax.device_get(state), step


def test_the_same_initialisation_on_any_mesh(setup, default_cpu_emitters):
    """Bit for bit, with XLA's default CPU emitters (the older ones, which the suite compiles
    with, round a few parameters 1 ulp differently on 8 devices)."""
    config, model, _ = setup
    tx, _ = optimizer_for(config, model)
    one, eight = (jax.device_get(init_state(config, model, tx, sharding.create_mesh(devices)))
                  for devices in (jax.devices()[:1], jax.devices()))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.heavy(seconds=30)
def test_eight_devices_equal_one(setup):
    """Each step, from the same state and batch, gives the same metrics and new state on 8
    devices as on 1 (float32 sums in another order: ~1e-6).

    Steps are compared one at a time, from the same state, because this tiny, freshly
    initialised network amplifies rounding differences from step to step.
    """
    config, model, batches = setup
    initial, step1 = _stepper(config, model, jax.devices()[:1])
    _, step8 = _stepper(config, model, jax.devices())
    state = initial  # both steps start from this (1-device) state
    for batch in batches:
        state1, metrics1 = step1(state, batch)
        state8, metrics8 = step8(state, batch)
        for k in metrics1:
            rtol = 1e-3 if k == "grad_norm" else 2e-5  # see the momentum buffers below
            np.testing.assert_allclose(metrics8[k], metrics1[k], rtol=rtol, err_msg=k)
        # What the step changed agrees: a sharding error (statistics or bases averaged per
        # device, a batch split wrongly) would change it by O(1).
        for name, tolerance in (("params", 1e-3), ("batch_stats", 1e-4), ("bases", 1e-4)):
            before, one, eight = (_flat(getattr(s, name)) for s in (state, state1, state8))
            assert np.linalg.norm(one - before) > 0, name
            relative = np.linalg.norm(eight - one) / np.linalg.norm(one - before)
            assert relative < tolerance, (name, relative)
        # Momentum buffers are raw gradients: this network amplifies rounding ~400x there (a
        # 1e-6 relative change of the parameters moves some gradients by 4e-4, measured). So
        # each buffer is compared as a whole, by relative norm: at most 1.2e-4 measured over
        # the three steps. Element by element, small entries of large buffers differ by more
        # (the stem's, of scale 0.6, by up to 1.4e-5 absolute: float32 sums over 8 x 32 x 32
        # pixels in another order).
        for a, b in zip(jax.tree.leaves(state1.opt_state), jax.tree.leaves(state8.opt_state),
                        strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.linalg.norm(b - a) <= 1e-3 * np.linalg.norm(a), ("opt_state", a.shape)
        state = state1
    assert int(state.step) == 3
    assert np.isfinite(metrics1["loss"])
    # The bases moved with the global batch's mean.
    moved = [
        np.abs(a - b).max()
        for a, b in zip(jax.tree.leaves(state.bases), jax.tree.leaves(initial.bases), strict=True)
    ]
    assert min(moved) > 1e-4


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_dropout_mask_does_not_depend_on_the_mesh(setup):
    """Dropout2d draws the same mask for a sharded batch as for one device (partitionable
    threefry), so the training forward is the same function on any mesh."""
    config, _, batches = setup
    images = batches[0]["image"]
    outputs = {}
    for rate in (0.0, 0.5):
        model_config = config.model.copy_and_resolve_references()
        model_config.dropout = rate
        model = create_model(model_config, num_classes=5)
        variables = model.init(jax.random.PRNGKey(0), images[:1], train=False)

        def forward(variables, images, model=model):
            out, _ = model.apply(variables, images, train=True,
                                 rngs={"dropout": jax.random.PRNGKey(7)},
                                 mutable=["batch_stats", "bases"])
            return out["logits"]

        mesh = sharding.create_mesh(jax.devices())
        sharded = sharding.global_batch({"image": images}, mesh)["image"]
        outputs[rate] = jax.jit(forward)(variables, images)
        eight = jax.jit(forward)(jax.device_put(variables, sharding.replicated(mesh)), sharded)
        np.testing.assert_allclose(eight, outputs[rate], rtol=1e-4, atol=1e-4)
    assert np.abs(outputs[0.5] - outputs[0.0]).max() > 1e-2  # the mask did drop channels
