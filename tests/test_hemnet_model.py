"""HEMNet: shapes, head parameter counts, bf16, gradient flow through the HEM unit, resizing."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hemnet_jax.config import emanet, model_config
from hemnet_jax.models import HEMNet, create_model
from hemnet_jax.models.resize import resize_bilinear_align_corners

NUM_CLASSES = 21


def config(**overrides):
    m = model_config()
    m.update(overrides)
    return m


def tiny_config(**overrides):
    # stage4: 256 channels; C = 16, K = 4.
    tiny = dict(backbone="resnet_tiny", base_width=8, head_channels=16, head_mid_channels=8)
    return config(**{**tiny, "num_bases": 4, **overrides})


def n_params(tree):
    return sum(math.prod(p.shape) for p in jax.tree.leaves(tree))


def abstract_init(model, size, batch=1):
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)


@pytest.fixture(scope="module")
def tiny():
    """A tiny HEMNet, its variables and a batch of two 33x33 images."""
    model = create_model(tiny_config(), NUM_CLASSES)
    images = jax.random.normal(jax.random.key(1), (2, 33, 33, 3))
    init = jax.jit(lambda key, x: model.init(key, x, train=False))
    return model, init(jax.random.key(0, impl="rbg"), images), images


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("size", [513, 512])
def test_logits_shapes_real_model(output_stride, size):
    model = create_model(config(output_stride=output_stride), NUM_CLASSES)
    out, variables = abstract_init(model, size)
    assert set(out) == {"logits"}
    assert out["logits"].shape == (1, size, size, NUM_CLASSES)
    assert out["logits"].dtype == jnp.float32
    assert set(variables) == {"params", "batch_stats", "bases"}
    assert variables["bases"]["hem"]["mu"].shape == (64, 512)


def test_aux_head_shape_and_parameters():
    model = create_model(config(aux_head=True), NUM_CLASSES)
    out, variables = abstract_init(model, 129)
    assert out["aux_logits"].shape == out["logits"].shape == (1, 129, 129, NUM_CLASSES)
    params = variables["params"]
    # 3x3 conv 1024 -> 256 (no bias) + BN(256) + conv1x1 256 -> 21 with bias.
    aux = 1024 * 256 * 9 + 2 * 256 + 256 * NUM_CLASSES + NUM_CLASSES
    assert n_params(params["aux_conv"]) + n_params(params["aux_classifier"]) == aux


def head_params_by_hand(c, mid=256, classes=NUM_CLASSES, backbone_channels=2048):
    conv_bn = lambda cin, cout: 9 * cin * cout + 2 * cout  # noqa: E731  3x3 conv, BN scale+bias
    hem = (c * c + c) + c * c + 2 * c  # conv1x1 with bias, conv1x1 without, BN
    return conv_bn(backbone_channels, c) + hem + conv_bn(c, mid) + mid * classes + classes


@pytest.mark.parametrize("c, expected", [(512, 11_149_589), (256, 5_446_677)])
def test_head_parameter_counts(c, expected):
    assert head_params_by_hand(c) == expected
    model = create_model(config(head_channels=c), NUM_CLASSES)
    _, variables = abstract_init(model, 65)
    params = variables["params"]
    assert set(params) == {"backbone", "head_in", "hem", "head_out", "classifier"}
    assert n_params(params) - n_params(params["backbone"]) == expected
    # The bases are state, not parameters: K x C in their own collection.
    assert n_params(variables["bases"]) == 64 * c


def test_emanet_is_a_config_of_the_same_model():
    hem_model = create_model(tiny_config(), NUM_CLASSES)
    ema_model = create_model(emanet(tiny_config()), NUM_CLASSES)
    assert type(ema_model) is HEMNet
    unit = ema_model.hem
    assert (unit.step_size, unit.temperature, unit.l2_normalize, unit.stop_em_gradient) == (
        1.0, 1.0, True, True,
    )
    shapes = lambda m: jax.tree.map(lambda a: a.shape, abstract_init(m, 33)[1])  # noqa: E731
    assert shapes(hem_model) == shapes(ema_model)


@pytest.fixture(scope="module")
def tiny_eval(tiny):
    """Evaluation forward of the tiny model: (logits, the classifier's low-resolution output)."""
    model, variables, images = tiny
    out, state = jax.jit(
        lambda v, x: model.apply(
            v, x, train=False, mutable=["intermediates"],
            capture_intermediates=lambda m, method: m.name == "classifier",
        )
    )(variables, images)
    (low,) = state["intermediates"]["classifier"]["__call__"]
    return out["logits"], low


def test_initialisation_follows_emanet(tiny):
    params = tiny[1]["params"]
    # Backbone convs: Normal(0, sqrt(2 / (k * k * out))), untruncated.
    kernel = params["backbone"]["layer4_1"]["conv2"]["kernel"]  # 3x3, 64 -> 64
    assert float(jnp.std(kernel)) == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.02)
    assert float(jnp.abs(kernel).max()) > 3 * math.sqrt(2 / (9 * 64))  # not truncated at 2 std
    # Head convs: PyTorch's Conv2d default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in EMANet.
    bound = 1 / math.sqrt(9 * 256)
    kernel = params["head_in"]["conv"]["kernel"]  # 3x3, 256 -> 16
    assert float(jnp.abs(kernel).max()) <= bound
    assert float(jnp.std(kernel)) == pytest.approx(bound / math.sqrt(3), rel=0.02)
    bias = params["classifier"]["conv"]["bias"]
    assert float(jnp.abs(bias).max()) <= 1 / math.sqrt(8) and float(jnp.abs(bias).max()) > 0
    # BatchNorm: scale 1, bias 0.
    bn = params["backbone"]["layer2_0"]["bn3"]
    assert bool(jnp.all(bn["scale"] == 1)) and bool(jnp.all(bn["bias"] == 0))


def test_bfloat16_forward_is_finite_and_close_to_float32(tiny, tiny_eval):
    model, variables, images = tiny
    bf16 = create_model(tiny_config(dtype="bfloat16"), NUM_CLASSES)
    out16 = jax.jit(lambda v, x: bf16.apply(v, x, train=False))(variables, images)
    ref, got = tiny_eval[0], out16["logits"]
    assert got.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(got)))
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert rel < 2e-2, rel  # ~3e-3 in practice
    assert rel > 0  # it really ran in bfloat16


def test_gradient_reaches_the_backbone_through_the_hem_path(tiny):
    _, variables, images = tiny
    weights = jax.random.normal(jax.random.key(2), (2, 33, 33, NUM_CLASSES))

    @jax.jit
    def grads(params):  # one compilation for both models
        out = []
        for stop_em_gradient in (False, True):
            model = create_model(tiny_config(stop_em_gradient=stop_em_gradient), NUM_CLASSES)

            def loss(p, model=model):
                logits = model.apply({**variables, "params": p}, images, train=False)["logits"]
                return jnp.sum(logits * weights)

            out.append(jax.grad(loss)(params))
        return out

    hem, cut = grads(variables["params"])
    # The unit's input conv feeds only the EM path: no gradient when it is cut.
    assert float(jnp.abs(cut["hem"]["conv_in"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(hem["hem"]["conv_in"]["kernel"]).max()) > 0.0
    for path in [("stem_conv1", "kernel"), ("layer4_2", "conv3", "kernel")]:
        g_hem, g_cut = hem["backbone"], cut["backbone"]
        for key in path:
            g_hem, g_cut = g_hem[key], g_cut[key]
        rel = float(jnp.linalg.norm(g_hem - g_cut) / jnp.linalg.norm(g_cut))
        assert rel > 0.05, (path, rel)  # ~0.3-0.5 in practice


def test_training_forward_updates_state_and_returns_intermediates(tiny):
    model, variables, images = tiny
    dropouts = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout):
            dropouts.append((context.module.rate, tuple(context.module.broadcast_dims)))
        return next_fun(*args, **kwargs)

    @jax.jit
    def train_forward(v, x, key):
        return model.apply(
            v, x, train=True, num_iters=5, rngs={"dropout": key},
            mutable=["batch_stats", "bases", "intermediates"],
        )

    with nn.intercept_methods(record):
        out, state = train_forward(variables, images, jax.random.key(3))
    assert dropouts == [(0.1, (1, 2))]  # Dropout2d: whole channels per image
    assert bool(jnp.all(jnp.isfinite(out["logits"])))
    (mu,) = state["intermediates"]["hem"]["mu"]
    assert mu.shape == (5, 2, 4, 16)  # [T_eval, B, K, C]: num_iters overrides T
    changed = lambda a, b: not np.allclose(a, b)  # noqa: E731
    assert changed(state["bases"]["hem"]["mu"], variables["bases"]["hem"]["mu"])
    stats = state["batch_stats"]["backbone"]["stem_bn1"]["mean"]
    assert changed(stats, variables["batch_stats"]["backbone"]["stem_bn1"]["mean"])
    out2, _ = train_forward(variables, images, jax.random.key(4))
    assert changed(out["logits"], out2["logits"])  # dropout is active in training


@pytest.mark.parametrize(
    "in_size, out_size", [((5, 7), (13, 20)), ((13, 9), (5, 4)), ((1, 4), (3, 1))]
)
def test_resize_matches_torch_align_corners(in_size, out_size):
    x = np.random.default_rng(0).normal(size=(2, *in_size, 3)).astype(np.float32)
    got = resize_bilinear_align_corners(jnp.asarray(x), out_size)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=out_size, mode="bilinear",
        align_corners=True,
    ).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)


def test_logits_corners_are_the_low_resolution_corners(tiny_eval):
    logits, low = tiny_eval
    assert low.shape == (2, 5, 5, NUM_CLASSES)  # ceil(33 / 8)
    for i, j in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:  # align_corners=True
        np.testing.assert_allclose(logits[:, i, j], low[:, i, j], rtol=1e-5, atol=1e-5)
