"""The PASCAL VOC colour palette: label maps <-> palette PNGs and colour pictures.

VOC's SegmentationClass PNGs are palette ('P' mode) images whose pixel values are the class
indices; this palette only says how to show them. Decode them to indices, never to colours.
"""

import numpy as np
from PIL import Image


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The VOC devkit's colour map (`VOClabelcolormap.m`): uint8 [num_colors, 3].

    Index i gets the bits of i spread over the high bits of R, G and B: 0 black, 1 (128, 0, 0),
    2 (0, 128, 0), ..., 255 (224, 224, 192), the colour of VOC's void border.
    """
    index = np.arange(num_colors)
    palette = np.zeros((num_colors, 3), np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


def colorize(label: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Class indices uint/int [..., H, W] -> colours uint8 [..., H, W, 3] (255 -> void colour)."""
    palette = voc_palette() if palette is None else palette
    return palette[np.asarray(label, np.int64)]


def to_palette_image(label: np.ndarray) -> Image.Image:
    """Class indices [H, W] in 0..255 -> a 'P'-mode PIL image with the VOC palette (a VOC PNG)."""
    label = np.asarray(label)
    if label.ndim != 2 or label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise ValueError(f"expected a [H, W] label map in 0..255, got shape {label.shape}")
    height, width = label.shape
    image = Image.frombytes("P", (width, height), label.astype(np.uint8).tobytes())
    image.putpalette(voc_palette().reshape(-1).tolist())
    return image
