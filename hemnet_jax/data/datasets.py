"""Registry of the datasets: what training and evaluation need to know, without TensorFlow."""

import dataclasses

from hemnet_jax.data import classes, scenes
from hemnet_jax.errors import UserError


class UnknownDatasetError(ValueError, UserError):
    """A dataset name that is not registered; the message lists the known ones."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A dataset as the training and evaluation code see it.

    Attributes:
      name: TFDS name, optionally with a config ("voc2012_aug", "pascal_context/60").
      num_classes: classes scored; labels are in [0, num_classes) or ignore_label.
      class_names: num_classes names, index = label.
      train_split, eval_split: TFDS split names.
      ignore_label: label of pixels never scored (void, unlabelled, padding).
      eval_pad_size: (height, width) holding every image of eval_split: a valid
        `make_eval_dataset(pad_size=...)`.
      needs_download: whether the builder needs the user's downloads in manual_dir.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    train_split: str
    eval_split: str
    ignore_label: int = classes.IGNORE_LABEL
    eval_pad_size: tuple[int, int] | None = None
    needs_download: bool = True

    def __post_init__(self):
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} names, {self.num_classes=}")


def _synthetic(name: str, preset: str) -> DatasetInfo:
    spec = scenes.PRESETS[preset]
    return DatasetInfo(
        name=name,
        num_classes=len(scenes.SYNTHETIC_CLASSES),
        class_names=scenes.SYNTHETIC_CLASSES,
        train_split="train",
        eval_split="val",
        eval_pad_size=(spec.height, spec.width),
        needs_download=False,
    )


def _context(name: str, with_background: bool) -> DatasetInfo:
    names = classes.CONTEXT_60_CLASSES if with_background else classes.CONTEXT_59_CLASSES
    return DatasetInfo(name, len(names), names, "train", "val", eval_pad_size=(500, 500))


_REGISTRY: dict[str, DatasetInfo] = {
    "voc2012_aug": DatasetInfo(
        "voc2012_aug", 21, classes.VOC_CLASSES, "train_aug", "val", eval_pad_size=(500, 500)
    ),
    "pascal_context": _context("pascal_context", with_background=False),
    "pascal_context/59": _context("pascal_context/59", with_background=False),
    "pascal_context/60": _context("pascal_context/60", with_background=True),
    "coco_stuff10k": DatasetInfo(
        "coco_stuff10k", 171, classes.COCO_STUFF_CLASSES, "train", "test", eval_pad_size=(640, 640)
    ),
    "synthetic_scenes": _synthetic("synthetic_scenes", "default"),
    **{f"synthetic_scenes/{p}": _synthetic(f"synthetic_scenes/{p}", p) for p in scenes.PRESETS},
}


def registry() -> dict[str, DatasetInfo]:
    """Every registered dataset by name (what `config_check.check(datasets=...)` takes)."""
    return dict(_REGISTRY)


def dataset_names() -> tuple[str, ...]:
    """Every name get_dataset_info knows."""
    return tuple(_REGISTRY)


def get_dataset_info(name: str) -> DatasetInfo:
    """The DatasetInfo of a registered dataset (a TFDS name, optionally "name/config").

    Raises:
      UnknownDatasetError: unknown name; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownDatasetError(
            f"Unknown dataset {name!r}; known: {', '.join(dataset_names())}"
        ) from None
