"""Tiny fake downloads laid out exactly like the real ones, for the dataset tests.

Each writer creates the folder tree of the real archive under `root` (and, with `archive=True`,
packs it into an archive of the real name and removes the tree). Images are JPEGs of 8x8 colour
blocks whose colour encodes the block's class (`block_colour`), so a label can be checked
against its image; every writer returns the labels it wrote, as stored by the builder.
"""

import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from hemnet_jax.data.palette import to_palette_image

BLOCK = 8


def block_colour(cls: np.ndarray) -> np.ndarray:
    """Class -> RGB uint8 [..., 3]; class_of_colour inverts it (also after JPEG and resizing)."""
    cls = np.asarray(cls, np.int64)
    return np.stack([(cls * 37) % 256, 255 - (cls * 37) % 256, np.full_like(cls, 128)], -1).astype(
        np.uint8
    )


def class_of_colour(rgb: np.ndarray) -> np.ndarray:
    """Inverse of block_colour for classes < 7 (red channel = 37 * class)."""
    return np.rint(np.asarray(rgb, np.float64)[..., 0] / 37).astype(np.int64)


def block_label(seed: int, height: int, width: int, num_classes: int) -> np.ndarray:
    """Random classes per 8x8 block: int64 [height, width]."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, num_classes, (-(-height // BLOCK), -(-width // BLOCK)))
    return np.kron(blocks, np.ones((BLOCK, BLOCK), np.int64))[:height, :width]


def write_jpeg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=100, subsampling=0)


def write_ids(path: Path, ids: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def pack(root: Path, members: Iterable[str], archive: str) -> Path:
    """Packs root/member trees into root/archive (tar, tgz, tar.gz or zip); removes the trees."""
    path = root / archive
    if archive.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as z:
            for member in members:
                for file in sorted((root / member).rglob("*")):
                    z.write(file, file.relative_to(root))
    else:
        mode = "w" if archive.endswith(".tar") else "w:gz"
        with tarfile.open(path, mode) as t:
            for member in members:
                t.add(root / member, arcname=member)
    for member in members:
        shutil.rmtree(root / member)
    return path


def _size(example_id: str) -> tuple[int, int]:
    """Varied small sizes, a function of the id."""
    k = sum(map(ord, example_id))
    return 16 + 8 * (k % 3), 24 + 8 * (k % 2)


def write_voc2012(
    root: Path,
    *,
    train: list[str],
    val: list[str],
    archive: bool,
    label_fn: Callable[[str, int, int], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """VOCdevkit/VOC2012 with train/val segmentation lists; labels have a 255 void border."""
    voc = root / "VOCdevkit" / "VOC2012"
    labels = {}
    for i, example_id in enumerate([*train, *val]):
        h, w = _size(example_id)
        label = block_label(i, h, w, 7) if label_fn is None else label_fn(example_id, h, w)
        write_jpeg(voc / "JPEGImages" / f"{example_id}.jpg", block_colour(label % 256))
        label = label.copy()
        label[0, :] = 255  # void border, as VOC draws around objects
        (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        to_palette_image(label).save(voc / "SegmentationClass" / f"{example_id}.png")
        labels[example_id] = label
    sets = voc / "ImageSets" / "Segmentation"
    write_ids(sets / "train.txt", train)
    write_ids(sets / "val.txt", val)
    write_ids(sets / "trainval.txt", [*train, *val])
    if archive:
        pack(root, ["VOCdevkit"], "VOCtrainval_11-May-2012.tar")
    return labels


def write_sbd(root: Path, *, train: list[str], val: list[str], archive: bool) -> dict:
    """benchmark_RELEASE/dataset with img/, cls/<id>.mat (GTcls.Segmentation), train/val.txt."""
    dataset = root / "benchmark_RELEASE" / "dataset"
    labels = {}
    for i, example_id in enumerate([*train, *val]):
        h, w = _size(example_id)
        label = block_label(100 + i, h, w, 7).astype(np.uint8)
        write_jpeg(dataset / "img" / f"{example_id}.jpg", block_colour(label))
        write_sbd_mat(dataset / "cls" / f"{example_id}.mat", label)
        labels[example_id] = label
    write_ids(dataset / "train.txt", train)
    write_ids(dataset / "val.txt", val)
    if archive:
        pack(root, ["benchmark_RELEASE"], "benchmark.tgz")
    return labels


def write_sbd_mat(path: Path, segmentation: np.ndarray) -> None:
    """SBD's layout: a struct GTcls with Boundaries, Segmentation and CategoriesPresent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    present = np.unique(segmentation[(segmentation > 0) & (segmentation < 255)]).astype(np.uint8)
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = np.zeros((1, 1), np.uint8)
    scipy.io.savemat(
        path,
        {
            "GTcls": {
                "Boundaries": boundaries,
                "Segmentation": segmentation.astype(np.uint8),
                "CategoriesPresent": present.reshape(-1, 1),
            }
        },
    )


def write_pascal_context(
    root: Path, *, train: list[str], val: list[str], full_ids: list[int], archive: bool
) -> dict[str, np.ndarray]:
    """VOCdevkit/VOC2010 (images, ImageSets/Main) + trainval/<id>.mat with LabelMap (uint16).

    Returns the full-annotation label maps (ids from `full_ids`, 0 = unlabelled).
    """
    voc = root / "VOCdevkit" / "VOC2010"
    maps = {}
    for i, example_id in enumerate([*train, *val]):
        h, w = _size(example_id)
        which = block_label(200 + i, h, w, len(full_ids))
        label_map = np.asarray(full_ids, np.uint16)[which]
        write_jpeg(voc / "JPEGImages" / f"{example_id}.jpg", block_colour(which))
        path = root / "trainval" / f"{example_id}.mat"
        path.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(path, {"LabelMap": label_map})
        maps[example_id] = label_map
    write_ids(voc / "ImageSets" / "Main" / "train.txt", train)
    write_ids(voc / "ImageSets" / "Main" / "val.txt", val)
    if archive:
        pack(root, ["VOCdevkit"], "VOCtrainval_03-May-2010.tar")
        pack(root, ["trainval"], "trainval.tar.gz")
    return maps


def write_coco_stuff10k(
    root: Path, *, train: list[str], test: list[str], source_ids: list[int], archive: bool
) -> dict[str, np.ndarray]:
    """images/, annotations/<id>.mat (S, names, captions), imageLists/ at the zip's top level.

    Returns the source label maps S (ids from `source_ids`, 0 = unlabelled).
    """
    maps = {}
    for i, example_id in enumerate([*train, *test]):
        h, w = _size(example_id)
        which = block_label(300 + i, h, w, len(source_ids))
        s = np.asarray(source_ids, np.uint16)[which]
        write_jpeg(root / "images" / f"{example_id}.jpg", block_colour(which))
        path = root / "annotations" / f"{example_id}.mat"
        path.parent.mkdir(parents=True, exist_ok=True)
        names = np.array(["unlabeled", "person"], dtype=object)
        scipy.io.savemat(path, {"S": s, "names": names, "captions": np.array(["a"], object)})
        maps[example_id] = s
    write_ids(root / "imageLists" / "train.txt", train)
    write_ids(root / "imageLists" / "test.txt", test)
    write_ids(root / "imageLists" / "all.txt", [*train, *test])
    if archive:
        pack(root, ["images", "annotations", "imageLists"], "cocostuff-10k-v1.1.zip")
    return maps


def truncated_jpeg(path: Path) -> None:
    """Overwrites a JPEG with its first half: a corrupt download."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
