"""Procedural segmentation scenes (NumPy only): the content of the `synthetic_scenes` dataset.

Each scene is a cluttered, textured background with a few objects on it. Every object class has
its own shape and texture; colours are drawn for every object and every piece of clutter from
one shared palette, so colour says nothing about the class: a model must see shape and texture.
Objects vary in size, position and rotation; later objects occlude earlier ones and the label
is the class of the top object (0 = background, clutter included).
Deterministic: scene (split, index) depends only on (spec.seed, split, index).
"""

import dataclasses
import math
import zlib

import numpy as np

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "background",
    "striped_disc",  # disc, stripes near horizontal
    "checkered_square",  # square, checkerboard aligned with it
    "dotted_triangle",  # triangle, dots on a lattice
    "solid_cross",  # plus sign, one colour
    "hatched_ring",  # annulus, grid of thin lines
)

# Shared by objects and clutter: saturated hues, greys, black and white.
PALETTE = np.array(
    [
        (220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 40), (200, 60, 200),
        (40, 200, 200), (240, 140, 40), (130, 80, 40), (245, 245, 245), (25, 25, 25),
        (128, 128, 128), (150, 200, 90),
    ],
    np.float32,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """Size of the scenes and of the splits.

    Attributes:
      height, width: image size in pixels.
      num_train, num_val: examples in the train and val splits.
      seed: every scene is a function of (seed, split, index).
      max_objects: 1..max_objects objects per scene.
      clutter_density: background clutter pieces per 64x64 pixels (at 64x64; the clutter scales
        with the image, like the objects and their textures).
    """

    height: int = 64
    width: int = 64
    num_train: int = 512
    num_val: int = 128
    seed: int = 0
    max_objects: int = 4
    clutter_density: float = 10.0


# Named specs, the builder's configs: default (the CPU demo), tiny (tests and smoke runs) and
# large (VOC-sized images, for the input pipeline benchmark).
PRESETS: dict[str, SceneSpec] = {
    "default": SceneSpec(),
    "tiny": SceneSpec(height=32, width=32, num_train=48, num_val=16, max_objects=3),
    "large": SceneSpec(height=375, width=500, num_train=192, num_val=48),
}


def render(spec: SceneSpec, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene `index` of `split` -> (image uint8 [H, W, 3], label uint8 [H, W])."""
    rng = np.random.default_rng([spec.seed, zlib.crc32(split.encode()), index])
    canvas = _Canvas(spec.height, spec.width, rng)
    canvas.background()
    area_units = spec.height * spec.width / (64 * canvas.unit) ** 2
    for _ in range(rng.poisson(spec.clutter_density * area_units)):
        canvas.clutter()
    for _ in range(rng.integers(1, spec.max_objects + 1)):
        canvas.object(int(rng.integers(1, len(SYNTHETIC_CLASSES))))
    return canvas.finish()


class _Canvas:
    """An image and its label map being painted."""

    def __init__(self, height: int, width: int, rng: np.random.Generator):
        self.h, self.w, self.rng = height, width, rng
        self.unit = min(height, width) / 64  # texture periods and clutter sizes scale with it
        self.image = np.zeros((height, width, 3), np.float32)
        self.label = np.zeros((height, width), np.uint8)

    def colour(self) -> np.ndarray:
        return PALETTE[self.rng.integers(len(PALETTE))] * self.rng.uniform(0.75, 1.15)

    def two_colours(self) -> tuple[np.ndarray, np.ndarray]:
        i, j = self.rng.choice(len(PALETTE), size=2, replace=False)
        scale = self.rng.uniform(0.75, 1.15)
        return PALETTE[i] * scale, PALETTE[j] * scale

    def window(self, cy: float, cx: float, radius: float):
        """Slices of the image around (cy, cx) and pixel-centre offsets (dy, dx) from it."""
        y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, self.h)
        x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, self.w)
        if y0 >= y1 or x0 >= x1:
            return None
        dy, dx = np.meshgrid(
            np.arange(y0, y1, dtype=np.float32) + 0.5 - cy,
            np.arange(x0, x1, dtype=np.float32) + 0.5 - cx,
            indexing="ij",
        )
        return (slice(y0, y1), slice(x0, x1)), dy, dx

    def paint(self, where, mask: np.ndarray, pixels: np.ndarray, label: int | None) -> None:
        region = self.image[where]
        region[mask] = pixels[mask] if pixels.ndim == 3 else pixels
        if label is not None:
            self.label[where][mask] = label

    def background(self) -> None:
        """Two colours mixed by smooth noise."""
        c1, c2 = self.two_colours()
        weight = _smooth_noise(self.rng, self.h, self.w, cells=int(self.rng.integers(2, 6)))
        self.image[:] = c1 * weight[..., None] + c2 * (1 - weight[..., None])

    def clutter(self) -> None:
        """A line, a blob or a speckled patch in a palette colour; labelled background."""
        cy, cx = self.rng.uniform(0, self.h), self.rng.uniform(0, self.w)
        kind = self.rng.integers(3)
        if kind == 0:  # line segment
            length = self.rng.uniform(8, 30) * self.unit
            win = self.window(cy, cx, length / 2 + 2)
            if win is None:
                return
            where, dy, dx = win
            angle = self.rng.uniform(0, math.pi)
            along = dx * math.cos(angle) + dy * math.sin(angle)
            across = -dx * math.sin(angle) + dy * math.cos(angle)
            width = self.rng.uniform(0.6, 1.5) * self.unit
            mask = (np.abs(along) <= length / 2) & (np.abs(across) <= width)
            self.paint(where, mask, self.colour(), None)
        elif kind == 1:  # ellipse blob
            ry, rx = self.rng.uniform(2, 7, size=2) * self.unit
            win = self.window(cy, cx, max(ry, rx))
            if win is None:
                return
            where, dy, dx = win
            self.paint(where, (dy / ry) ** 2 + (dx / rx) ** 2 <= 1, self.colour(), None)
        else:  # patch of random speckle in two colours
            half = self.rng.uniform(3, 8) * self.unit
            win = self.window(cy, cx, half)
            if win is None:
                return
            where, dy, dx = win
            c1, c2 = self.two_colours()
            speckle = self.rng.random(dy.shape) < 0.5
            pixels = np.where(speckle[..., None], c1, c2)
            self.paint(where, (np.abs(dy) <= half) & (np.abs(dx) <= half), pixels, None)

    def object(self, cls: int) -> None:
        """An object of class `cls` with its shape and texture, on top of what is there."""
        size = min(self.h, self.w)
        radius = self.rng.uniform(0.12, 0.3) * size
        cy, cx = self.rng.uniform(0, self.h), self.rng.uniform(0, self.w)
        win = self.window(cy, cx, radius * 1.5)
        if win is None:
            return
        where, dy, dx = win
        angle = self.rng.uniform(0, 2 * math.pi)
        u = dx * math.cos(angle) + dy * math.sin(angle)  # object-aligned coordinates
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        c1, c2 = self.two_colours()
        unit, rng = self.unit, self.rng
        if cls == 1:  # striped disc
            mask = u**2 + v**2 <= radius**2
            tilt = rng.uniform(-0.35, 0.35)
            period = rng.uniform(4, 6) * unit
            texture = np.mod(dy * math.cos(tilt) + dx * math.sin(tilt), period) < period / 2
        elif cls == 2:  # checkered square
            half = radius * 0.8
            mask = (np.abs(u) <= half) & (np.abs(v) <= half)
            cell = rng.uniform(2.5, 4) * unit
            texture = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
        elif cls == 3:  # dotted triangle
            mask = _triangle(u, v, radius)
            spacing = rng.uniform(4.5, 6.5) * unit
            ou, ov = np.mod(u, spacing) - spacing / 2, np.mod(v, spacing) - spacing / 2
            texture = ou**2 + ov**2 <= (0.3 * spacing) ** 2
        elif cls == 4:  # solid cross
            arm = radius / 3
            mask = ((np.abs(u) <= radius) & (np.abs(v) <= arm)) | (
                (np.abs(u) <= arm) & (np.abs(v) <= radius)
            )
            texture = np.ones_like(mask)
        elif cls == 5:  # hatched ring
            r2 = u**2 + v**2
            mask = (r2 <= radius**2) & (r2 >= (0.55 * radius) ** 2)
            period = rng.uniform(3.5, 5) * unit
            line = max(period / 4, 0.6)
            texture = (np.mod(u, period) < line) | (np.mod(v, period) < line)
        else:
            raise ValueError(f"no object class {cls}")
        pixels = np.where(texture[..., None], c1, c2)
        self.paint(where, mask, pixels, cls)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        noise = self.rng.normal(0, 6, self.image.shape).astype(np.float32)
        image = np.clip(np.rint(self.image + noise), 0, 255).astype(np.uint8)
        return image, self.label


def _triangle(u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Equilateral triangle with circumradius `radius` around the origin."""
    inside = np.ones(u.shape, bool)
    for k in range(3):
        a = 2 * math.pi * k / 3
        inside &= u * math.cos(a) + v * math.sin(a) <= radius / 2
    return inside


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Bilinearly interpolated random grid in [0, 1]: float32 [h, w]."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    ys, xs = np.linspace(0, cells, h, dtype=np.float32), np.linspace(0, cells, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy
