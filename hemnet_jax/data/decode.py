"""Image decoding as the official EMANet code does it: PIL's, to the grey level.

PIL decodes JPEGs with libjpeg's accurate integer inverse DCT (JDCT_ISLOW) and fancy chroma
upsampling. TensorFlow's `decode_image` (what TFDS's Image feature calls) uses the fast integer
DCT instead, which differs from PIL by a few grey levels (up to 16 on a real VOC image);
`decode_jpeg(dct_method="INTEGER_ACCURATE")` is libjpeg's JDCT_ISLOW and gives PIL's pixels
exactly (tests/test_official_recipe.py). PNGs are lossless: every decoder agrees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hemnet_jax.data.tf_devices import tensorflow

if TYPE_CHECKING:  # imported when first used (tf_devices.tensorflow)
    import tensorflow as tf


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """An encoded JPEG or PNG (string scalar) -> uint8 [H, W, 3], JPEGs exactly as PIL's
    `Image.open(f).convert("RGB")` (grayscale images get their one channel three times)."""
    tf = tensorflow()
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_png(encoded, channels=3, dtype=tf.uint8),
    )
    image.set_shape([None, None, 3])
    return image
