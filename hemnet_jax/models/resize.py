"""Bilinear resizing with align_corners=True semantics (PyTorch's F.interpolate, EMANet's output).

`jax.image.resize` is half-pixel (align_corners=False). With align_corners=True the corner pixels
of input and output coincide: output index i samples input position i * (in - 1) / (out - 1).
Bilinear interpolation is separable, so the resize is two small [out, in] interpolation matrices
applied by einsum: matmuls, fast on TPU/GPU, exact in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def interpolation_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out_size, in_size] float32 matrix W with W @ v = v linearly resampled, corners aligned."""
    if out_size == 1 or in_size == 1:
        pos = np.zeros(out_size)  # PyTorch samples index 0 when out == 1
    else:
        pos = np.arange(out_size) * ((in_size - 1) / (out_size - 1))
    lo = np.minimum(np.floor(pos).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = pos - lo
    w = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(w, (rows, lo), 1.0 - frac)
    np.add.at(w, (rows, hi), frac)
    return w.astype(np.float32)


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, h, w, C] -> [B, H, W, C] bilinear, align_corners=True; computed in x's dtype."""
    height, width = size
    wh = jnp.asarray(interpolation_matrix(height, x.shape[1]), x.dtype)
    ww = jnp.asarray(interpolation_matrix(width, x.shape[2]), x.dtype)
    hi = jax.lax.Precision.HIGHEST  # TPU's default f32 matmul would round to bfloat16
    x = jnp.einsum("oh,bhwc->bowc", wh, x, precision=hi)
    return jnp.einsum("pw,bowc->bopc", ww, x, precision=hi)
