"""Building blocks shared by the backbone and the heads: initialisers, padding, Conv1x1,
ConvBNReLU.

Initialisation follows EMANet's code (REFERENCE.md):
  - backbone convs (and the HEM unit's): Normal(0, sqrt(2 / (k * k * out_channels))), untruncated;
  - head convs (ConvBNReLU before/after the unit, classifiers): EMANet never re-initialises
    them, so they keep PyTorch's Conv2d default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the
    kernel and the bias;
  - BatchNorm: scale 1, bias 0 (Flax's default).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Any

# Backbone and HEM-unit convs: Normal(0, sqrt(2 / (k * k * out_channels))), EMANet's init.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# PyTorch's Conv2d default, kaiming_uniform(a=sqrt(5)): U(-b, b), b = sqrt(3 * (1/3) / fan_in).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """PyTorch's Conv2d default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def same_padding(kernel_size: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's symmetric padding dilation * (k - 1) / 2 on H and W.

    Unlike XLA's "SAME" (which pads stride-2 convs asymmetrically on even inputs), this gives
    out = floor((in - 1) / stride) + 1 exactly like the PyTorch model the weights come from.
    """
    p = dilation * (kernel_size - 1) // 2
    return ((p, p), (p, p))


class ConvBNReLU(nn.Module):
    """Bias-free k x k conv -> BatchNorm -> ReLU. [B, H, W, Cin] -> [B, H, W, features]."""

    features: int
    kernel_size: int = 3
    kernel_init: Initializer = torch_default_kernel_init
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        k = self.kernel_size
        x = nn.Conv(
            self.features, (k, k), padding=same_padding(k), use_bias=False,
            kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
            dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name, name="bn",
        )(x)
        return nn.relu(x)


class Conv1x1(nn.Module):
    """A 1x1 convolution computed as a matmul over channels: nn.Conv's parameters (kernel
    [1, 1, Cin, Cout], optional bias), names, initialisation and dtype promotion, same values.
    [..., H, W, Cin] -> [..., ceil(H / strides), ceil(W / strides), features], as nn.Conv with
    "VALID" padding.

    Used for the HEM unit's convs and the ResNet bottlenecks' 1x1 convs. XLA's CPU backend runs
    the backward pass of a 1x1 `conv_general_dilated` about 2x slower than the same contraction
    as a dot (benchmarks/README.md); GPU and TPU lower both to the same matrix units."""

    features: int
    use_bias: bool = True
    strides: int = 1  # subsampling, as nn.Conv's strides with "VALID" padding for a 1x1 kernel
    kernel_init: Any = conv_init
    bias_init: Any = nn.initializers.zeros_init()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None
        )
        if self.strides > 1:
            x = x[..., :: self.strides, :: self.strides, :]
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.einsum("...c,cd->...d", x, kernel[0, 0])
        return y if bias is None else y + bias
