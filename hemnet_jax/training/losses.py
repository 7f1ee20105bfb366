"""Pixel-wise losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from hemnet_jax.data.classes import IGNORE_LABEL


def cross_entropy(
    logits: jax.Array, labels: jax.Array, ignore_label: int = IGNORE_LABEL
) -> jax.Array:
    """Mean softmax cross-entropy over the pixels whose label is not `ignore_label`.

    Args:
      logits: [B, H, W, K] (any float dtype; computed in float32). labels: [B, H, W] integers.
    Returns:
      A scalar; 0 when every pixel is ignored. Under jit with a sharded batch the mean is over
      the global batch.
    """
    valid = labels != ignore_label
    safe = jnp.where(valid, labels, 0)
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, per_pixel, 0.0)) / jnp.maximum(count, 1)
