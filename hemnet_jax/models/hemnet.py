"""HEMNet: dilated ResNet -> ConvBNReLU(2048 -> C) -> HEM unit -> ConvBNReLU(C -> 256)
-> Dropout2d(0.1) -> conv1x1 to the classes -> bilinear upsample (align_corners=True).

The layout of EMANet's code (REFERENCE.md); EMANet itself is this model with the EMANet HEM
settings (`hemnet_jax.config.emanet`). An optional FCN auxiliary head on stage 3 (PSPNet/encoding
style: 3x3 conv to a quarter of the channels, BN, ReLU, Dropout2d(0.1), conv1x1) adds a training
loss; it is off by default.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hemnet_jax.models.hem_unit import HEMUnit
from hemnet_jax.models.layers import ConvBNReLU, torch_default_bias_init, torch_default_kernel_init
from hemnet_jax.models.resize import resize_bilinear_align_corners
from hemnet_jax.models.resnet import ResNet


def valid_pixels(heights: jax.Array, widths: jax.Array, canvas: tuple[int, int]) -> jax.Array:
    """[B, PH, PW] bool: True on each example's real top-left heights[b] x widths[b] pixels of
    a padded canvas (PH, PW); the `valid` argument of `HEMNet.__call__`."""
    rows = jnp.arange(canvas[0])[None, :, None] < jnp.asarray(heights)[:, None, None]
    cols = jnp.arange(canvas[1])[None, None, :] < jnp.asarray(widths)[:, None, None]
    return rows & cols


def feature_mask(valid: jax.Array, stride: int) -> jax.Array:
    """The pixel mask valid [B, H, W] at the backbone's resolution [B, h, w], h = (H - 1) // s + 1.

    Feature position i is centred on pixel s i (stride-s convs with symmetric padding); it is
    valid when a valid pixel lies in the rows (s (i - 1), s i] (and likewise for columns). For an
    image of h0 x w0 real pixels at the top-left that keeps exactly the positions of the image
    padded to the next size with size % s == 1 (EMANet's evaluation: 375 -> 377 -> 48 rows at
    s = 8), so the HEM unit sees what it sees in the official evaluation.
    """
    s = stride
    windows = jax.lax.reduce_window(
        valid.astype(jnp.int32), 0, jax.lax.max, (1, s, s), (1, s, s),
        ((0, 0), (s - 1, 0), (s - 1, 0)),
    )
    return windows > 0


class Classifier(nn.Module):
    """[Dropout2d] -> conv1x1 with bias. [B, h, w, Cin] -> [B, h, w, num_classes] float32."""

    num_classes: int
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        # Dropout2d: one keep/drop decision per (image, channel), broadcast over H and W.
        x = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(x)
        x = nn.Conv(
            self.num_classes, (1, 1), kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(x.shape[-1]), dtype=self.dtype,
            param_dtype=self.param_dtype, name="conv",
        )(x)
        return x.astype(jnp.float32)


HEM_SCOPE = "hem"  # HEMNet's attribute (so module name) for its HEM unit


class HEMNet(nn.Module):
    """Semantic segmentation with a HEM unit. See the module docstring for the layout.

    Attributes:
      backbone: the ResNet (its variables live under "backbone").
      hem: the HEM unit; its channels are head_channels (C).
      num_classes: classifier outputs.
      head_channels: C, the conv before the HEM unit outputs it (512 or 256 in the paper).
      head_mid_channels: the conv after the HEM unit (256).
      dropout_rate: Dropout2d before the classifiers.
      aux_head: add the FCN head on stage 3 ("aux_logits").
      bn_momentum, bn_epsilon, dtype, param_dtype, axis_name: of the head's layers, as ResNet's.
    """

    backbone: ResNet
    hem: HEMUnit
    num_classes: int
    head_channels: int = 512
    head_mid_channels: int = 256
    dropout_rate: float = 0.1
    aux_head: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        *,
        train: bool,
        num_iters: int | None = None,
        valid: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """images [B, H, W, 3] -> {"logits": [B, H, W, classes] float32, "aux_logits" (if aux)}.

        num_iters overrides T of the HEM unit (T_eval). valid: [B, H, W] bool, or None: the real
        pixels of images padded to a fixed canvas; the HEM unit then sees only the feature
        positions of the real region (`feature_mask`) in its M-step and bases average.
        In training pass rngs={"dropout": key} and mutable=["batch_stats", "bases"];
        mutable=["intermediates"] also returns the HEM unit's mu, gamma and x_tilde.
        """
        size = images.shape[1:3]
        features = self.backbone(images, train=train)

        x = self._conv_bn_relu(self.head_channels, "head_in")(features["stage4"], train=train)
        mask = None
        if valid is not None:
            mask = feature_mask(valid, self.backbone.output_stride)
            if mask.shape != x.shape[:3]:
                raise ValueError(f"valid {valid.shape} does not match the images {images.shape}.")
        x = self.hem(x, train=train, num_iters=num_iters, mask=mask)
        x = self._conv_bn_relu(self.head_mid_channels, "head_out")(x, train=train)
        logits = self._classifier("classifier")(x, train=train)
        outputs = {"logits": resize_bilinear_align_corners(logits, size)}

        if self.aux_head:
            stage3 = features["stage3"]
            y = self._conv_bn_relu(stage3.shape[-1] // 4, "aux_conv")(stage3, train=train)
            aux_logits = self._classifier("aux_classifier")(y, train=train)
            outputs["aux_logits"] = resize_bilinear_align_corners(aux_logits, size)
        return outputs

    def _conv_bn_relu(self, features: int, name: str) -> ConvBNReLU:
        return ConvBNReLU(
            features, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype,
            param_dtype=self.param_dtype, axis_name=self.axis_name, name=name,
        )

    def _classifier(self, name: str) -> Classifier:
        return Classifier(
            self.num_classes, self.dropout_rate, dtype=self.dtype, param_dtype=self.param_dtype,
            name=name,
        )
