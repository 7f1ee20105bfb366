"""Segment a folder of images: colour-coded masks (VOC palette) and overlay pictures.

    python -m hemnet_jax.evaluation.predict --config configs/voc.py --workdir DIR \
        --images PHOTOS --output OUT [--config.eval.multi_scale=True]

For each image `PHOTOS/NAME.EXT` (jpg, png, bmp, gif, tif, webp; not recursive) it writes
`OUT/NAME.png`, the predicted classes as a palette PNG (pixel value = class index, VOC colours;
what VOC's SegmentationClass files are), and `OUT/NAME_overlay.png`, the image blended with the
colours. The predictor is the one `config.eval` asks for (single scale by default, MS + flip with
`eval.multi_scale`), with T_eval = `eval.num_iters`. Images are normalised as in evaluation and
padded at the bottom/right as `eval.padding` says: "fixed", to `data.eval_pad_size` (larger
images to their size rounded up to a multiple of 32), the padding masked out of the HEM unit;
"official", to the next size with size % output_stride == 1. Each new canvas size compiles
once. One device, one image at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from PIL import Image, UnidentifiedImageError

from hemnet_jax import cli, config_check, storage
from hemnet_jax.data import augment, palette
from hemnet_jax.errors import UserError
from hemnet_jax.evaluation import predictors
from hemnet_jax.training import sharding, state

PROGRAM = "python -m hemnet_jax.evaluation.predict"  # as named in one-line errors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
OVERLAY_ALPHA = 0.5  # weight of the class colours in the overlay


class ImageReadError(ValueError, UserError):
    """An input image cannot be read or decoded; the message names the file."""


class ImageFolderError(ValueError, UserError):
    """The image folder holds no image, or two images whose outputs would share a name."""


class MissingImageFolderError(FileNotFoundError, UserError):
    """The image folder does not exist."""


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in `folder`, sorted by name.

    Raises:
      FileNotFoundError: `folder` does not exist or is not a directory.
      ImageFolderError: no image in it, or two images whose outputs would share a name
        (a.jpg, a.png).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingImageFolderError(
            f"Image folder {str(folder)!r} does not exist or is not a folder (--images)."
        )
    paths = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ImageFolderError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {str(folder)!r}.")
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise ImageFolderError(f"{stems[p.stem].name} and {p.name} would write the same "
                                   f"outputs ({p.stem}.png): rename one.")
        stems[p.stem] = p
    return paths


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an image file (palette, grey and alpha converted to RGB).

    Raises:
      ImageReadError: not an image, truncated or corrupt; the message names the file.
    """
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"Cannot read image {str(path)!r}: {e}") from e


def normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32, normalised exactly as the input pipeline does."""
    return augment.normalize(rgb).numpy()


def canvas_size(height: int, width: int, pad_size: int | tuple[int, int]) -> tuple[int, int]:
    """The padded size an image is predicted at: `pad_size` if the image fits, else its own
    size rounded up to a multiple of 32 (each new size compiles once)."""
    ph, pw = (pad_size, pad_size) if isinstance(pad_size, int) else tuple(pad_size)

    def fit(size: int, pad: int) -> int:
        return pad if size <= pad else -(-size // 32) * 32

    return fit(height, ph), fit(width, pw)


def canvas_batch(rgb: np.ndarray, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """One image as evaluation sees it: {"image": float32 [1, PH, PW, 3] normalised, 0 (the mean
    colour) on the padding at the bottom and right, "height", "width": int32 [1]}. The canvas
    is `eval.padding`'s: "fixed", `canvas_size(..., data.eval_pad_size)` (the model is then
    masked: `predictors.make_predictor`); "official", the next size with size % stride == 1."""
    height, width = rgb.shape[:2]
    if predictors.padding_mode(config.eval) == "official":
        ph, pw = (augment.official_padded_size(n, config.model.output_stride)
                  for n in (height, width))  # fmt: skip
    else:
        ph, pw = canvas_size(height, width, config.data.eval_pad_size)
    image = np.zeros((1, ph, pw, 3), np.float32)
    image[0, :height, :width] = normalize(rgb)
    return {"image": image, "height": np.array([height], np.int32),
            "width": np.array([width], np.int32)}  # fmt: skip


def make_segmenter(
    model, variables: dict, config: ml_collections.ConfigDict
) -> Callable[[np.ndarray], np.ndarray]:
    """A function uint8 RGB [H, W, 3] -> class indices uint8 [H, W], on one device."""
    predictor = predictors.make_predictor(model, config.eval, num_iters=config.eval.num_iters)
    classify = jax.jit(lambda v, batch: jnp.argmax(predictor(v, batch), axis=-1))

    def segment(rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        labels = classify(variables, canvas_batch(rgb, config))
        return np.asarray(labels)[0, :height, :width].astype(np.uint8)

    return segment


def overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 [H, W, 3]: the image blended with the VOC colours of `labels` [H, W]."""
    colours = palette.colorize(labels).astype(np.float32)
    return np.round((1 - alpha) * rgb.astype(np.float32) + alpha * colours).astype(np.uint8)


def predict_folder(
    segment: Callable[[np.ndarray], np.ndarray], images: str | os.PathLike,
    output: str | os.PathLike,
) -> list[tuple[Path, Path]]:
    """Writes `output/NAME.png` (palette mask) and `output/NAME_overlay.png` per image.

    Returns:
      [(mask path, overlay path)] in the images' order.
    Raises:
      FileNotFoundError, ImageFolderError: see `list_images`. ImageReadError: a corrupt image
      (outputs of the images before it are kept).
    """
    paths = list_images(images)
    output = Path(output).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        rgb = read_image(path)
        labels = segment(rgb)
        mask_path, overlay_path = output / f"{path.stem}.png", output / f"{path.stem}_overlay.png"
        palette.to_palette_image(labels).save(mask_path)
        Image.fromarray(overlay(rgb, labels)).save(overlay_path)
        written.append((mask_path, overlay_path))
    return written


def _define_flags() -> None:
    cli.define_config_flag("A configs/*.py file (with :variant): the config it was trained with.")
    cli.define_checkpoint_flags()
    flags.DEFINE_string("images", None, "Folder of images to segment.")
    flags.DEFINE_string("output", None, "Folder for the masks and overlays (created).")
    flags.mark_flags_as_required(["images", "output"])


def main(argv: list[str]) -> None:
    cli.no_extra_arguments(argv)
    cli.require_checkpoint_source()
    FLAGS = flags.FLAGS
    cli.quiet_library_logs()
    images, output = (config_check.expand_path(p) for p in (FLAGS.images, FLAGS.output))
    storage.require_local(PROGRAM, {"--images": images, "--output": output})
    for key in ("workdir", "checkpoint"):  # may be gs://
        storage.check_bucket(FLAGS[key].value, f"--{key}")
    config_check.check(FLAGS.config, folders={"--output": output})
    list_images(images)  # fail on a bad folder before restoring
    restored = state.restore_for_eval(
        FLAGS.config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint,
        mesh=sharding.create_mesh(jax.local_devices()[:1]),
    )
    segment = make_segmenter(restored.model, restored.variables, FLAGS.config)
    written = predict_folder(segment, images, output)
    print(f"Wrote {len(written)} masks and overlays to {output} (checkpoint {restored.path}).")


if __name__ == "__main__":
    cli.run(main, _define_flags)
