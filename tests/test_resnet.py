"""The dilated ResNet backbone: layout, dilations, shapes and parameter counts.

Real sizes (ResNet-50/101/152) are only traced (jax.eval_shape), never allocated.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hemnet_jax.config import model_config
from hemnet_jax.models import create_backbone
from hemnet_jax.models.layers import Conv1x1
from hemnet_jax.models.resnet import STAGE_SIZES, ResNet, block_layout


def emanet_make_layer_dilations(stage_sizes, output_stride, grids=(1, 2, 4)):
    """(stride, dilation) per block, transcribed from EMANet's ResNet.__init__ / _make_layer."""
    if output_stride == 16:
        stages = [(1, 1, None), (2, 1, None), (2, 1, None), (1, 2, list(grids))]
    else:
        stages = [(1, 1, None), (2, 1, None), (1, 2, None), (1, 4, list(grids))]
    layout = []
    for blocks, (stride, dilation, g) in zip(stage_sizes, stages, strict=True):
        g = g if g is not None else [1] * blocks
        first = {1: 1, 2: 1, 4: 2}[dilation]
        layout.append(((stride, first),) + tuple((1, dilation * g[i]) for i in range(1, blocks)))
    return tuple(layout)


@pytest.mark.parametrize("name", sorted(STAGE_SIZES))
@pytest.mark.parametrize("output_stride", [8, 16])
def test_block_layout_is_emanets(name, output_stride):
    sizes = STAGE_SIZES[name]
    assert block_layout(sizes, output_stride, (1, 2, 4)) == emanet_make_layer_dilations(
        sizes, output_stride
    )


def test_block_layout_resnet101_explicit():
    os8 = block_layout(STAGE_SIZES["resnet101"], 8, (1, 2, 4))
    assert os8[0] == ((1, 1),) * 3
    assert os8[1] == ((2, 1),) + ((1, 1),) * 3
    assert os8[2] == ((1, 1),) + ((1, 2),) * 22
    assert os8[3] == ((1, 2), (1, 8), (1, 16))
    os16 = block_layout(STAGE_SIZES["resnet101"], 16, (1, 2, 4))
    assert os16[2] == ((2, 1),) + ((1, 1),) * 22
    assert os16[3] == ((1, 1), (1, 4), (1, 8))


def test_block_layout_rejects_bad_settings():
    with pytest.raises(ValueError, match="output_stride"):
        block_layout(STAGE_SIZES["resnet50"], 32, (1, 2, 4))
    with pytest.raises(ValueError, match="multi_grid"):
        block_layout(STAGE_SIZES["resnet50"], 8, (1, 2))


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def trace_convs(model, image_size=65):
    """{module path: (strides, kernel_dilation, kernel_size)} of every nn.Conv and Conv1x1, from
    a trace."""
    convs = {}

    def record(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__":
            if isinstance(m, nn.Conv):
                convs["/".join(m.path)] = (pair(m.strides), pair(m.kernel_dilation), m.kernel_size)
            elif isinstance(m, Conv1x1):
                convs["/".join(m.path)] = (pair(m.strides), (1, 1), (1, 1))
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return convs


@pytest.mark.parametrize("output_stride", [8, 16])
def test_modules_follow_the_dilation_pattern(output_stride):
    sizes = STAGE_SIZES["resnet101"]
    convs = trace_convs(ResNet(sizes, output_stride=output_stride))
    expected = emanet_make_layer_dilations(sizes, output_stride)
    for s, blocks in enumerate(expected):
        for b, (stride, dilation) in enumerate(blocks):
            block = f"layer{s + 1}_{b}"
            assert convs[f"{block}/conv2"] == ((stride,) * 2, (dilation,) * 2, (3, 3)), block
            assert convs[f"{block}/conv1"][:2] == ((1, 1), (1, 1))
            assert convs[f"{block}/conv3"][:2] == ((1, 1), (1, 1))
            if b == 0:
                assert convs[f"{block}/downsample_conv"][:2] == ((stride,) * 2, (1, 1))
            else:
                assert f"{block}/downsample_conv" not in convs
    stem = {k: v for k, v in convs.items() if k.startswith("stem")}
    assert stem == {
        "stem_conv1": ((2, 2), (1, 1), (3, 3)),
        "stem_conv2": ((1, 1), (1, 1), (3, 3)),
        "stem_conv3": ((1, 1), (1, 1), (3, 3)),
    }
    assert len(convs) == 3 + 3 * sum(sizes) + 4


def test_torchvision_stem_is_7x7():
    convs = trace_convs(ResNet(STAGE_SIZES["resnet50"], stem="torchvision"))
    assert {k: v for k, v in convs.items() if k.startswith("stem")} == {
        "stem_conv1": ((2, 2), (1, 1), (7, 7))
    }


@pytest.mark.parametrize("stem", ["deep", "torchvision"])
@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("size", [513, 512])
def test_output_shapes(stem, output_stride, size):
    model = ResNet(STAGE_SIZES["resnet101"], stem=stem, output_stride=output_stride)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    out, _ = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False), x
    )
    h = math.ceil(size / output_stride)  # 65 / 64 at OS 8, 33 / 32 at OS 16
    assert out["stage3"].shape == (2, h, h, 1024)
    assert out["stage4"].shape == (2, h, h, 2048)


def param_count(model):
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
    "name, stem, expected",
    [
        ("resnet50", "torchvision", 23_508_032),  # torchvision resnet50 without fc
        ("resnet101", "torchvision", 42_500_160),  # torchvision resnet101 without fc
        ("resnet152", "torchvision", 58_143_808),  # torchvision resnet152 without fc
        # 7x7 stem -> 3x3 64-64-128 (+102,912 incl. BN); layer1's first 1x1 and shortcut
        # read 128 channels instead of 64 (+4,096 +16,384). EMANet's Table 1: 42.6 M.
        ("resnet101", "deep", 42_500_160 - 9_408 - 128 + 112_320 + 512 + 4_096 + 16_384),
    ],
)
def test_parameter_counts(name, stem, expected):
    assert param_count(ResNet(STAGE_SIZES[name], stem=stem)) == expected


def test_bfloat16_compute_float32_state():
    model = ResNet(STAGE_SIZES["resnet50"], dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32)
    out, variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False), x
    )
    assert out["stage4"].dtype == jnp.bfloat16
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("use_bias", [False, True])
def test_conv1x1_is_a_1x1_conv(size, strides, use_bias):
    """Conv1x1 (a matmul) computes nn.Conv's 1x1 "VALID" conv from the same parameters: values,
    input and parameter gradients (float64; odd and even sizes, strided)."""
    with jax.enable_x64():
        x = jax.random.normal(jax.random.key(0), (2, size, size, 5), jnp.float64)
        conv = nn.Conv(3, (1, 1), strides=strides, padding="VALID", use_bias=use_bias,
                       dtype=jnp.float64, param_dtype=jnp.float64)
        matmul = Conv1x1(3, use_bias=use_bias, strides=strides, dtype=jnp.float64,
                         param_dtype=jnp.float64)
        params = conv.init(jax.random.key(1), x)
        assert jax.tree.map(jnp.shape, matmul.init(jax.random.key(1), x)) == jax.tree.map(
            jnp.shape, params)
        if use_bias:  # a non-zero bias, so that its gradient and value are both checked
            params = {"params": {**params["params"], "bias": jnp.arange(3.0)}}

        def loss(module, p, x):
            return jnp.sum(jnp.sin(module.apply(p, x)))

        ref = conv.apply(params, x)
        out = matmul.apply(params, x)
        assert out.shape == ref.shape == (2, -(-size // strides), -(-size // strides), 3)
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
        g_ref = jax.grad(lambda p, x: loss(conv, p, x), (0, 1))(params, x)
        g_out = jax.grad(lambda p, x: loss(matmul, p, x), (0, 1))(params, x)
        for a, b in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_conv1x1_promotes_dtypes_as_nn_conv():
    x = jnp.ones((1, 4, 4, 8), jnp.float32)
    for dtype in (jnp.bfloat16, jnp.float32):
        conv = nn.Conv(4, (1, 1), dtype=dtype)
        matmul = Conv1x1(4, dtype=dtype)
        params = conv.init(jax.random.key(0), x)
        assert matmul.apply(params, x).dtype == conv.apply(params, x).dtype == dtype


def test_unknown_backbone_names_the_choices():
    config = model_config()
    config.backbone = "resnet34"
    with pytest.raises(ValueError, match=r"'resnet34'.*resnet101"):
        create_backbone(config)
