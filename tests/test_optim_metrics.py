"""The optimiser against PyTorch's SGD with EMANet's parameter groups; metrics by hand."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from hemnet_jax import config as cfg
from hemnet_jax.evaluation import metrics
from hemnet_jax.training import losses, optim


def _train_config(**kw):
    t = cfg.train_config()
    t.update(dict(num_steps=10, learning_rate=0.1, weight_decay=0.01, **kw))
    return t


PARAMS = {
    "conv": {"kernel": np.arange(6.0).reshape(1, 1, 2, 3) / 10, "bias": np.array([0.5, -0.5, 1.0])},
    "bn": {"scale": np.array([1.0, 2.0]), "bias": np.array([0.1, 0.2])},
}


def test_param_groups():
    groups = optim.param_groups(PARAMS)
    assert groups == {
        "conv": {"kernel": "weight", "bias": "bias"},
        "bn": {"scale": "norm", "bias": "norm"},
    }
    with pytest.raises(ValueError, match="odd/thing"):
        optim.param_groups({"odd": {"thing": np.zeros(2)}})


def test_poly_schedule():
    schedule = optim.poly_schedule(_train_config())
    for step in (0, 3, 9, 10):
        np.testing.assert_allclose(schedule(step), 0.1 * (1 - step / 10) ** 0.9, rtol=1e-6)


def test_sgd_matches_torch_with_emanet_groups():
    train = _train_config(bias_lr_mult=2.0, momentum=0.9)
    tx, schedule = optim.make_optimizer(train, PARAMS)
    params = jax.tree.map(jnp.asarray, PARAMS)
    state = tx.init(params)

    t = {
        k: torch.tensor(v, requires_grad=True)
        for k, v in {
            "w": PARAMS["conv"]["kernel"],
            "b": PARAMS["conv"]["bias"],
            "s": PARAMS["bn"]["scale"],
            "nb": PARAMS["bn"]["bias"],
        }.items()
    }
    opt = torch.optim.SGD(
        [
            {"params": [t["w"]], "lr": 0.1, "weight_decay": 0.01},
            {"params": [t["s"], t["nb"]], "lr": 0.1, "weight_decay": 0.0},
            {"params": [t["b"]], "lr": 0.2, "weight_decay": 0.0},
        ],
        lr=0.1,
        momentum=0.9,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / 10) ** 0.9)

    rng = np.random.default_rng(0)
    for _ in range(4):
        grads = jax.tree.map(lambda p: rng.standard_normal(p.shape), PARAMS)
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for name, g in zip(
            ("w", "b", "s", "nb"),
            (
                grads["conv"]["kernel"],
                grads["conv"]["bias"],
                grads["bn"]["scale"],
                grads["bn"]["bias"],
            ),
            strict=True,
        ):
            t[name].grad = torch.tensor(g)
        opt.step()
        sched.step()
    np.testing.assert_allclose(params["conv"]["kernel"], t["w"].detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(params["conv"]["bias"], t["b"].detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(params["bn"]["scale"], t["s"].detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(params["bn"]["bias"], t["nb"].detach().numpy(), rtol=1e-5)


def test_cross_entropy_ignores_255():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 5)), jnp.float32)
    labels = np.random.default_rng(1).integers(0, 5, (2, 3, 4))
    labels[0, 0, :] = 255
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(np.asarray(logits)).permute(0, 3, 1, 2),
        torch.tensor(labels),
        ignore_index=255,
    )
    np.testing.assert_allclose(
        losses.cross_entropy(logits, jnp.asarray(labels)), ref.item(), rtol=1e-6
    )
    assert float(losses.cross_entropy(logits, jnp.full((2, 3, 4), 255))) == 0.0


def test_confusion_matrix_and_miou_by_hand():
    labels = np.array([[0, 0, 1, 1, 255, 2]])
    preds = np.array([[0, 1, 1, 1, 2, 1]])
    conf = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), 4))
    expected = np.zeros((4, 4), int)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 1] = 1, 1, 2, 1
    np.testing.assert_array_equal(conf, expected)  # the 255 pixel is not counted
    m = metrics.segmentation_metrics(conf)
    # class 0: 1 / (1 + 0 + 1); class 1: 2 / (2 + 2 + 0); class 2: 0 / 1; class 3 absent -> NaN.
    np.testing.assert_allclose(m["per_class_iou"][:3], [0.5, 0.5, 0.0])
    assert np.isnan(m["per_class_iou"][3])
    np.testing.assert_allclose(m["miou"], (0.5 + 0.5 + 0.0) / 3)
    np.testing.assert_allclose(m["pixel_accuracy"], 3 / 5)
    table = metrics.format_table(m, ["bg", "cat", "dog", "cow"])
    assert "cow" in table and "mIoU" in table and "33.33" in table


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="'emanett'.*emanet"):
        cfg.apply_variants(cfg.base_config(), "emanett", cfg.VARIANTS, "configs/voc.py")
    assert isinstance(cfg.base_config(), ml_collections.ConfigDict)
