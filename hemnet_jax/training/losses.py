"""Pixel-wise losses."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax

from hemnet_jax.data.classes import IGNORE_LABEL

Normalization = Literal["valid_pixels", "all_pixels"]
NORMALIZATIONS = ("valid_pixels", "all_pixels")


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    ignore_label: int = IGNORE_LABEL,
    normalization: Normalization = "valid_pixels",
) -> jax.Array:
    """Softmax cross-entropy of the pixels whose label is not `ignore_label`, averaged.

    normalization (`train.loss_normalization`):
      "valid_pixels": sum over the batch's valid pixels / their number (0 if there are none).
      "all_pixels": EMANet's loss, NLL with reduction "none" (ignored pixels count 0) averaged
        over every pixel of each crop, then over the batch: sum over valid pixels / (B H W).
        An image's weight is then its valid fraction.

    Args:
      logits: [B, H, W, K] (any float dtype; computed in float32). labels: [B, H, W] integers.
    Returns:
      A scalar. Under jit with a sharded batch the mean is over the global batch.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"train.loss_normalization must be one of {NORMALIZATIONS}, got {normalization!r}."
        )
    valid = labels != ignore_label
    safe = jnp.where(valid, labels, 0)
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    total = jnp.sum(jnp.where(valid, per_pixel, 0.0))
    if normalization == "all_pixels":
        return total / labels.size
    return total / jnp.maximum(jnp.sum(valid), 1)
