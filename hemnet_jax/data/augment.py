"""Per-example preprocessing (TensorFlow ops): EMANet's training augmentation, evaluation padding.

Training: random scale from a set (bilinear image, nearest label), pad to the crop (image 0
after ImageNet normalisation, label 255), random crop, random horizontal flip; all draws from
stateless random ops, so an example's augmentation is a pure function of its seed.

The scale is the official code's, pixel for pixel (tests/test_official_recipe.py): PyTorch's
`F.interpolate(x, scale_factor=s)` gives floor(size * s) rows and columns; the image is
resampled bilinearly with align_corners=True (output o reads input o (in - 1) / (out - 1)) and
the label with `mode="nearest"`, which reads input floor(o * in / out) in float32, the rule of
the PyTorch versions the official code ran on (< 1.6; since 1.6 a given scale_factor is used
as floor(o / s), which differs on some rows: docs/reproducing.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hemnet_jax.data.classes import IGNORE_LABEL
from hemnet_jax.data.tf_devices import tensorflow

if TYPE_CHECKING:  # imported when first used (tf_devices.tensorflow)
    import tensorflow as tf


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)  # EMANet's training scales


def train_augment(
    image: tf.Tensor,
    label: tf.Tensor,
    seed: tf.Tensor,
    *,
    crop_size: tuple[int, int],
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
) -> dict[str, tf.Tensor]:
    """EMANet's augmentation of one example, a pure function of `seed`.

    Args:
      image: uint8 [H, W, 3]. label: uint8/int [H, W, 1] or [H, W].
      seed: int32/int64 [2], for tf.random.stateless_*.
      crop_size: (height, width) of the output.
      scales: one drawn uniformly; bilinear resize of the image, nearest of the label.
      flip: horizontal flip with probability 1/2.

    Returns:
      {"image": float32 [h, w, 3] ImageNet-normalised, 0 where padded,
       "label": int32 [h, w], 255 where padded or where the source had 255}.
    """
    tf = tensorflow()
    if label.shape.rank == 2:
        label = label[..., None]
    ch, cw = crop_size
    draws = tf.random.stateless_uniform([4], seed=seed)
    choice = tf.minimum(tf.cast(draws[0] * len(scales), tf.int32), len(scales) - 1)
    scale = tf.gather(tf.constant(scales, tf.float32), choice)
    image, label = scale_example(normalize(image), tf.cast(label, tf.int32), scale)
    scaled = tf.shape(image)[:2]
    pad_h, pad_w = tf.maximum(ch - scaled[0], 0), tf.maximum(cw - scaled[1], 0)
    image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])  # zeros = the mean colour
    label = tf.pad(label, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=IGNORE_LABEL)
    top = tf.cast(draws[1] * tf.cast(scaled[0] + pad_h - ch + 1, tf.float32), tf.int32)
    left = tf.cast(draws[2] * tf.cast(scaled[1] + pad_w - cw + 1, tf.float32), tf.int32)
    image = image[top : top + ch, left : left + cw]
    label = label[top : top + ch, left : left + cw, 0]
    if flip:
        flipped = draws[3] < 0.5
        image = tf.cond(flipped, lambda: image[:, ::-1], lambda: image)
        label = tf.cond(flipped, lambda: label[:, ::-1], lambda: label)
    image.set_shape([ch, cw, 3])
    label.set_shape([ch, cw])
    return {"image": image, "label": label}


def scale_example(
    image: tf.Tensor, label: tf.Tensor, scale: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """EMANet's random-scale step: image [H, W, C] float bilinear (align_corners=True), label
    [H, W, 1] nearest, both to floor(H s) x floor(W s) (at least 1), as
    `F.interpolate(..., scale_factor=s)` of the official dataset.py.

    TensorFlow's legacy resize kernels compute exactly these rules in float32: bilinear with
    align_corners reads input o (in - 1) / (out - 1); nearest without half-pixel centres reads
    min(floor(o * in / out), in - 1), PyTorch's `nearest` before 1.6.
    """
    tf = tensorflow()
    size = tf.shape(image)[:2]
    scaled = tf.maximum(tf.cast(tf.floor(tf.cast(size, tf.float32) * scale), tf.int32), 1)
    image = tf.raw_ops.ResizeBilinear(
        images=image[None], size=scaled, align_corners=True, half_pixel_centers=False
    )[0]
    label = tf.raw_ops.ResizeNearestNeighbor(
        images=label[None], size=scaled, align_corners=False, half_pixel_centers=False
    )[0]
    return image, label


def official_padded_size(size: tf.Tensor | int, stride: int) -> tf.Tensor | int:
    """EMANet's `pad_inf`: size + (stride + 1 - size % stride) % stride, the smallest size >= it
    with size % stride == 1 (375 -> 377, 500 -> 505 at stride 8); a tensor or a Python int."""
    return size + (stride + 1 - size % stride) % stride


def eval_pad(
    image: tf.Tensor,
    label: tf.Tensor,
    example_id: tf.Tensor,
    *,
    pad_size: tuple[int, int] | None = None,
    pad_stride: int | None = None,
) -> dict[str, tf.Tensor]:
    """One whole evaluation image, normalised and padded at the bottom/right to pad_size, or
    (pad_stride s, the official evaluation) to `official_padded_size` of its own size.

    Args: image uint8 [H, W, 3], label [H, W, 1] or [H, W], example_id string scalar.
    Returns: {"image": float32 [PH, PW, 3], "label": int32 [PH, PW], "id", "height", "width"}.
    """
    tf = tensorflow()
    if label.shape.rank == 3:
        label = label[..., 0]
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    if pad_stride is not None:
        ph, pw = official_padded_size(height, pad_stride), official_padded_size(width, pad_stride)
    else:
        ph, pw = pad_size
        fits = tf.debugging.Assert(
            (height <= ph) & (width <= pw),
            [
                f"An evaluation image is larger than pad_size={pad_size}: set pad_size (e.g. "
                "config.data.eval_pad_size) to at least its size, or to None for the largest "
                "of the split. Image id, height, width:",
                example_id, height, width,
            ],
        )  # fmt: skip
        with tf.control_dependencies([fits]):  # before the pads, which would fail less clearly
            height, width = tf.identity(height), tf.identity(width)
    image = tf.pad(normalize(image), [[0, ph - height], [0, pw - width], [0, 0]])
    label = tf.pad(tf.cast(label, tf.int32), [[0, ph - height], [0, pw - width]],
                   constant_values=IGNORE_LABEL)  # fmt: skip
    if pad_stride is None:
        image.set_shape([ph, pw, 3])
        label.set_shape([ph, pw])
    return {"image": image, "label": label, "id": example_id, "height": height, "width": width}


def normalize(image: tf.Tensor) -> tf.Tensor:
    """RGB in [0, 255] -> ImageNet-normalised float32: (x / 255 - mean) / std."""
    tf = tensorflow()
    mean = tf.constant(IMAGENET_MEAN, tf.float32)
    std = tf.constant(IMAGENET_STD, tf.float32)
    return (tf.cast(image, tf.float32) / 255.0 - mean) / std
