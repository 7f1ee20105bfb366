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

# Shared with the HEM unit: Normal(0, sqrt(2 / (k * k * out_channels))) and the 1x1 conv as a
# matmul.
from hemnet_jax.hem_unit import Conv1x1 as Conv1x1
from hemnet_jax.hem_unit import conv_init as conv_init

Initializer = Any

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
