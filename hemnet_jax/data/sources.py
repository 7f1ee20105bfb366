"""What the TFDS builders share: finding the user's downloads, reading and checking examples.

Every problem with the downloaded data is an error that names the file (and, for a missing
download, where it was looked for and where to get it); no example is ever skipped silently.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from hemnet_jax.data.classes import IGNORE_LABEL
from hemnet_jax.data.tf_devices import tensorflow
from hemnet_jax.errors import UserError


class MissingDataError(FileNotFoundError, UserError):
    """A download, or a file inside one, is not where the builder looked for it."""


class InvalidExampleError(ValueError, UserError):
    """An image or a label file is corrupt or inconsistent (size, label values)."""


@dataclasses.dataclass(frozen=True)
class Download:
    """One archive the user downloads into manual_dir, or its already-extracted folder.

    Attributes:
      archive: file name, e.g. "VOCtrainval_11-May-2012.tar".
      url: where to get it.
      roots: candidate folders of its content, relative to manual_dir or to the archive's
        extraction folder; the first is the one the archive creates.
      marker: a path inside the content folder that identifies it.
      description: what it is, for messages.
    """

    archive: str
    url: str
    roots: tuple[str, ...]
    marker: str
    description: str

    def instructions(self) -> str:
        folder = self.roots[0] or "its content"
        return (
            f"* {self.archive}: {self.description}.\n  From {self.url}\n"
            f"  Put the archive itself, or its extracted folder {folder}/, in manual_dir."
        )


def manual_download_instructions(downloads: Sequence[Download], notes: str = "") -> str:
    """MANUAL_DOWNLOAD_INSTRUCTIONS text for a builder from its downloads."""
    text = (
        "Download into manual_dir (train.py/eval.py: --config.data.manual_dir=DIR; "
        "python -m hemnet_jax.data.prepare NAME --manual_dir DIR):\n"
    )
    text += "\n".join(d.instructions() for d in downloads)
    return text + (f"\n{notes}" if notes else "")


def get_manual_dir(dl_manager: tfds.download.DownloadManager, dataset: str) -> Path:
    """dl_manager.manual_dir, with a MissingDataError naming the folder if it is absent or empty."""
    try:
        return Path(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS's way of saying the folder is missing or empty.
        raise MissingDataError(f"{dataset}: {e}") from e


def locate(
    download: Download, manual_dir: Path, dl_manager: tfds.download.DownloadManager, dataset: str
) -> Path:
    """The folder holding a download's content: extracted in manual_dir, or extracted by TFDS.

    Raises:
      MissingDataError: neither the folder nor the archive is in manual_dir, or the archive does
        not contain what it should.
    """
    for root in download.roots:
        if (manual_dir / root / download.marker).exists():
            return manual_dir / root
    archive = manual_dir / download.archive
    if archive.is_file():
        extracted = Path(dl_manager.extract(archive))
        for root in download.roots:
            if (extracted / root / download.marker).exists():
                return extracted / root
        raise MissingDataError(
            f"{dataset}: {archive} (extracted to {extracted}) contains no "
            f"{Path(download.roots[0], download.marker)}: is it {download.description}? "
            f"Get {download.archive} from {download.url}"
        )
    looked = ", ".join(str(manual_dir / root / download.marker) for root in download.roots)
    raise MissingDataError(
        f"{dataset}: {download.archive} ({download.description}) not found in manual_dir "
        f"{manual_dir}: looked for the archive {archive} and for {looked}. "
        f"Download it from {download.url}"
    )


def require_files(
    root: Path, relative_paths: Iterable[str], download: Download, dataset: str
) -> None:
    """Raises MissingDataError naming every listed file absent under root."""
    missing = [str(root / p) for p in relative_paths if not (root / p).exists()]
    if missing:
        raise MissingDataError(
            f"{dataset}: missing from {download.archive} ({download.url}): " + ", ".join(missing)
        )


def read_id_list(path: Path) -> list[str]:
    """Example ids of a split file (one per line, blank lines ignored), in order, deduplicated."""
    ids = (line.strip() for line in path.read_text().splitlines())
    return list(dict.fromkeys(i for i in ids if i))


def read_image(path: Path) -> tuple[bytes, tuple[int, int]]:
    """An RGB image file, checked to decode; returns (the bytes to store, (height, width)).

    JPEG and PNG files in RGB or grayscale are stored as they are (their bytes; the pipeline
    decodes JPEGs exactly as PIL does, `decode.py`); any other (CMYK JPEG, RGBA or palette
    PNG, other formats) is converted to RGB by PIL, as the official EMANet code reads images,
    and stored as a PNG: losslessly, so the pipeline sees PIL's conversion pixel for pixel.

    Raises:
      InvalidExampleError: the file is corrupt, truncated or not an image.
    """
    tf = tensorflow()
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format in ("JPEG", "PNG") and image.mode in ("RGB", "L"):
                converted = None
            else:
                converted = np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidExampleError(f"corrupt or unreadable image {path}: {e}") from e
    if converted is not None:
        png = io.BytesIO()
        Image.fromarray(converted).save(png, format="PNG")
        return png.getvalue(), converted.shape[:2]
    try:  # TensorFlow's decoder is the one the input pipeline uses: it must accept the file.
        shape = tf.io.decode_image(data, channels=3, expand_animations=False).shape
    except tf.errors.OpError as e:
        raise InvalidExampleError(f"corrupt image {path}: {e.message}") from e
    return data, (int(shape[0]), int(shape[1]))


def read_index_png(path: Path) -> np.ndarray:
    """A label PNG -> its pixel values (palette indices for 'P' mode), int64 [H, W].

    Raises:
      InvalidExampleError: corrupt, or a colour (RGB) PNG, whose colours are not class indices.
    """
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise InvalidExampleError(
                    f"{path}: label PNGs must be palette ('P') or grayscale ('L') images whose "
                    f"values are class indices, got mode {image.mode!r}"
                )
            return np.asarray(image, dtype=np.int64)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise InvalidExampleError(f"corrupt label image {path}: {e}") from e


def read_mat_labels(path: Path, variable: str, field: str | None = None) -> np.ndarray:
    """A label map stored in a MATLAB .mat file -> int64 [H, W].

    Args:
      path: the .mat file.
      variable: the top-level variable, e.g. "GTcls" (SBD), "S" (COCO-Stuff), "LabelMap".
      field: the struct field holding the map, e.g. "Segmentation" for SBD's GTcls.

    Raises:
      InvalidExampleError: unreadable, no such variable/field, not a 2-D integer map.
    """
    try:
        contents = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as e:  # scipy raises several unrelated types for a bad file.
        raise InvalidExampleError(f"corrupt or unreadable .mat file {path}: {e}") from e
    where = variable if field is None else f"{variable}.{field}"
    try:
        value: Any = contents[variable]
        if field is not None:
            value = getattr(value, field)
    except (KeyError, AttributeError) as e:
        names = sorted(k for k in contents if not k.startswith("__"))
        raise InvalidExampleError(f"{path} has no {where} (variables: {names})") from e
    value = np.asarray(value)
    if value.ndim != 2 or value.dtype.kind not in "uif" or not np.all(np.mod(value, 1) == 0):
        raise InvalidExampleError(
            f"{path}: {where} must be a 2-D integer label map, got {value.dtype} {value.shape}"
        )
    return value.astype(np.int64)


def remap(raw: np.ndarray, lut: Sequence[int], path: Path) -> np.ndarray:
    """Source ids -> stored labels through a lookup table; ids outside it name the file."""
    raw = np.asarray(raw)
    bad = (raw < 0) | (raw >= len(lut))
    if bad.any():
        raise InvalidExampleError(
            f"{path}: label ids {_few(np.unique(raw[bad]))} are outside the dataset's id range "
            f"[0, {len(lut)})"
        )
    return np.asarray(lut, np.int64)[raw]


def check_labels(label: np.ndarray, num_classes: int, path: Path) -> None:
    """Raises InvalidExampleError if a value is neither a class in [0, num_classes) nor 255."""
    bad = ((label < 0) | (label >= num_classes)) & (label != IGNORE_LABEL)
    if bad.any():
        raise InvalidExampleError(
            f"{path}: label values {_few(np.unique(label[bad]))} are neither classes "
            f"[0, {num_classes}) nor the ignore label {IGNORE_LABEL}"
        )


@dataclasses.dataclass(frozen=True)
class ExampleFiles:
    """The files of one example and how to read its label map (int [H, W], 255 = ignore)."""

    example_id: str
    image: Path
    label: Path
    read_label: Callable[[Path], np.ndarray]


def encode_example(files: ExampleFiles, num_classes: int) -> dict[str, Any]:
    """Reads and checks one example -> the builders' feature dict (image, label [H, W, 1], id).

    Raises:
      MissingDataError: a listed file is absent.
      InvalidExampleError: corrupt file, image and label sizes differ, or bad label values.
    """
    for path in (files.image, files.label):
        if not path.is_file():
            raise MissingDataError(
                f"{path} not found: example {files.example_id!r} is listed in the split files "
                "but its file is missing (incomplete download or extraction?)"
            )
    image, image_size = read_image(files.image)
    label = files.read_label(files.label)
    if tuple(label.shape) != tuple(image_size):
        raise InvalidExampleError(
            f"{files.label}: label size {tuple(label.shape)} differs from the size "
            f"{tuple(image_size)} of its image {files.image}"
        )
    check_labels(label, num_classes, files.label)
    return {
        "image": image,
        "label": label.astype(np.uint8)[..., None],
        "id": files.example_id,
    }


def segmentation_features(image_format: str = "jpeg") -> tfds.features.FeaturesDict:
    """Features of every builder: image uint8 [H, W, 3], label uint8 [H, W, 1] (PNG), id."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
            "label": tfds.features.Image(
                shape=(None, None, 1),
                encoding_format="png",
                doc="class index per pixel; 255 = ignore (void, unlabelled, unused classes)",
            ),
            "id": tfds.features.Text(doc="the source dataset's image id"),
        }
    )


def segmentation_info(
    builder: tfds.core.DatasetBuilder,
    *,
    description: str,
    homepage: str | None = None,
    citation: str = "",
    image_format: str = "jpeg",
) -> tfds.core.DatasetInfo:
    """The DatasetInfo all the segmentation builders share."""
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=segmentation_features(image_format),
        supervised_keys=("image", "label"),
        homepage=homepage,
        citation=citation,
    )


def _few(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    return f"[{shown}{', ...' if len(values) > limit else ''}]"
