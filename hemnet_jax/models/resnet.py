"""Dilated ResNet-50/101/152 backbones for segmentation, laid out as EMANet's code (REFERENCE.md).

- Bottleneck v1.5 (torchvision): the stride sits on the 3x3 conv; 1x1 projection shortcut.
- Stem "deep" (EMANet, PyTorch-Encoding): 3x3 convs 3->64 (stride 2), 64->64, 64->128, BN, ReLU,
  3x3 max pool stride 2. Stem "torchvision": 7x7 conv 3->64 stride 2, BN, ReLU, max pool.
- Output stride 16: layer4 dilated (2) instead of strided. Output stride 8: layer3 (2) and
  layer4 (4) dilated. See `block_layout` for the per-block dilations with multi-grid.
- The 1x1 convs (conv1, conv3, downsample) are `Conv1x1` matmuls, with nn.Conv's parameters.
- Padding is PyTorch's symmetric dilation * (k - 1) / 2, so converted ImageNet weights compute
  exactly what they computed in PyTorch (odd and even input sizes).

Flax module names mirror torchvision's (`layer3_4/conv2` is `layer3.4.conv2`); the stem's names
and the conversion rules live in `hemnet_jax.models.weights`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from hemnet_jax.models.layers import Conv1x1, conv_init, same_padding

Stem = Literal["deep", "torchvision"]
ModuleDef = Any

STAGE_SIZES: dict[str, tuple[int, int, int, int]] = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    "resnet_tiny": (1, 1, 2, 3),  # tests and CPU demos (with a small base_width)
}
EXPANSION = 4  # bottleneck output channels = 4 * width


def stage_sizes(backbone: str) -> tuple[int, int, int, int]:
    """Blocks per stage of a backbone name (`config.model.backbone`), e.g. resnet101 -> (3, 4,
    23, 3); a ValueError naming the choices for an unknown name."""
    if backbone not in STAGE_SIZES:
        raise ValueError(f"Unknown backbone {backbone!r}: expected one of {sorted(STAGE_SIZES)}.")
    return STAGE_SIZES[backbone]


def block_layout(
    stage_sizes: Sequence[int], output_stride: int, multi_grid: Sequence[int]
) -> tuple[tuple[tuple[int, int], ...], ...]:
    """(stride, dilation) of every block's 3x3 conv, stage by stage, as EMANet's `_make_layer`.

    A stage dilated by d instead of strided keeps the previous stage's dilation in its first
    block (as torchvision's replace_stride_with_dilation) and uses d * grid[i] in block i >= 1;
    the multi-grid applies to layer4 only, so multi_grid[0] is unused. With (1, 2, 4):
      OS 16: layer4 dilations (1, 4, 8).
      OS 8:  layer3 (1, 2, 2, ...), layer4 (2, 8, 16).
    """
    if output_stride == 8:
        strides, dilations = (1, 2, 1, 1), (1, 1, 2, 4)
    elif output_stride == 16:
        strides, dilations = (1, 2, 2, 1), (1, 1, 1, 2)
    else:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}.")
    if len(multi_grid) != stage_sizes[3]:
        raise ValueError(
            f"multi_grid {tuple(multi_grid)} needs one entry per layer4 block ({stage_sizes[3]})."
        )
    layout = []
    stages = zip(stage_sizes, strides, dilations, strict=True)
    for stage, (size, stride, dilation) in enumerate(stages):
        grid = multi_grid if stage == 3 else (1,) * size
        first = dilations[stage - 1] if stage > 0 else 1
        layout.append(
            ((stride, first),) + tuple((1, dilation * grid[i]) for i in range(1, size))
        )
    return tuple(layout)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), each followed by BN; projection shortcut.

    [B, H, W, Cin] -> [B, ceil(H / stride), ceil(W / stride), 4 * width].
    """

    width: int
    conv: ModuleDef
    conv1x1: ModuleDef
    norm: ModuleDef
    strides: int = 1
    dilation: int = 1
    project: bool = False  # 1x1 conv + BN shortcut ("downsample" in torchvision)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.dilation
        y = nn.relu(self.norm(name="bn1")(self.conv1x1(self.width, name="conv1")(x)))
        y = self.conv(
            self.width, (3, 3), strides=self.strides, padding=same_padding(3, d),
            kernel_dilation=d, name="conv2",
        )(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.norm(name="bn3")(self.conv1x1(EXPANSION * self.width, name="conv3")(y))
        if self.project:
            x = self.conv1x1(
                EXPANSION * self.width, strides=self.strides, name="downsample_conv"
            )(x)
            x = self.norm(name="downsample_bn")(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """Dilated ResNet backbone. images [B, H, W, 3] -> {"stage3": [B, h, w, 16 * base_width],
    "stage4": [B, h, w, 32 * base_width]}, h = ceil(H / output_stride) (65 for 513 at OS 8).

    Attributes:
      stage_sizes: blocks per stage, e.g. STAGE_SIZES["resnet101"].
      stem: "deep" (3x3 convs, EMANet) or "torchvision" (7x7).
      base_width: bottleneck width of layer1 (64); stage i has base_width * 2**i.
      output_stride: 8 or 16.
      multi_grid: layer4's grid, see `block_layout`.
      bn_momentum, bn_epsilon: BatchNorm, Flax convention (PyTorch momentum 0.1 is 0.9 here).
      dtype: compute dtype; param_dtype: parameters and BatchNorm statistics.
      axis_name: pmap/shard_map axis for cross-device BatchNorm statistics. Under jit with a
        sharded batch leave None: the statistics are over the global batch already.
    """

    stage_sizes: Sequence[int]
    stem: Stem = "deep"
    base_width: int = 64
    output_stride: int = 8
    multi_grid: Sequence[int] = (1, 2, 4)
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        conv = functools.partial(
            nn.Conv, use_bias=False, padding="VALID", kernel_init=conv_init, dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        conv1x1 = functools.partial(
            Conv1x1, use_bias=False, kernel_init=conv_init, dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
            epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
            axis_name=self.axis_name,
        )
        x = self._stem(images.astype(self.dtype), conv, norm)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=same_padding(3))

        layout = block_layout(self.stage_sizes, self.output_stride, self.multi_grid)
        features = {}
        for stage, blocks in enumerate(layout):
            for i, (stride, dilation) in enumerate(blocks):
                x = Bottleneck(
                    self.base_width * 2**stage, conv=conv, conv1x1=conv1x1, norm=norm,
                    strides=stride, dilation=dilation, project=i == 0,
                    name=f"layer{stage + 1}_{i}",
                )(x)
            features[f"stage{stage + 1}"] = x
        return {"stage3": features["stage3"], "stage4": features["stage4"]}

    def _stem(self, x: jax.Array, conv: ModuleDef, norm: ModuleDef) -> jax.Array:
        """[B, H, W, 3] -> [B, ceil(H / 2), ceil(W / 2), stem width], before the max pool."""
        w = self.base_width
        if self.stem == "torchvision":
            x = conv(w, (7, 7), strides=2, padding=same_padding(7), name="stem_conv1")(x)
            return nn.relu(norm(name="stem_bn1")(x))
        if self.stem != "deep":
            raise ValueError(f"Unknown stem {self.stem!r}: expected 'deep' or 'torchvision'.")
        x = conv(w, (3, 3), strides=2, padding=same_padding(3), name="stem_conv1")(x)
        x = nn.relu(norm(name="stem_bn1")(x))
        x = conv(w, (3, 3), padding=same_padding(3), name="stem_conv2")(x)
        x = nn.relu(norm(name="stem_bn2")(x))
        x = conv(2 * w, (3, 3), padding=same_padding(3), name="stem_conv3")(x)
        return nn.relu(norm(name="stem_bn3")(x))
