"""TFDS builder `voc2012_aug`: PASCAL VOC 2012 segmentation with the SBD augmented labels.

Splits (counts on the real data):
  train_aug: 10,582 = (SBD train + SBD val + VOC train) minus every VOC val image, deduplicated.
  train: 1,464 (VOC train). val: 1,449 (VOC val).
Labels: 21 classes (0 = background), 255 = VOC's void border. An image of VOC train takes its
VOC label (a palette PNG, read as palette indices); the others take SBD's (`GTcls.Segmentation`
in cls/<id>.mat), the usual practice. Images come from the same dataset as their label.

Build: `tfds build hemnet_jax/data/voc2012_aug.py --manual_dir DIR [--data_dir D]`, or in
Python `hemnet_jax.data.prepare.prepare_dataset("voc2012_aug", data_dir=D, manual_dir=DIR)`.
"""

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from hemnet_jax.data import sources
from hemnet_jax.data.classes import VOC_CLASSES

VOC = sources.Download(
    archive="VOCtrainval_11-May-2012.tar",
    url="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    roots=("VOCdevkit/VOC2012", "VOCtrainval_11-May-2012/VOCdevkit/VOC2012"),
    marker="ImageSets/Segmentation",
    description="PASCAL VOC 2012 trainval (2 GB)",
)
SBD = sources.Download(
    archive="benchmark.tgz",
    url="http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/"
    "benchmark.tgz",
    roots=("benchmark_RELEASE/dataset", "benchmark/benchmark_RELEASE/dataset"),
    marker="cls",
    description="Semantic Boundaries Dataset (SBD) of Hariharan et al. (1.4 GB)",
)


def train_aug_ids(
    voc_train: list[str], voc_val: list[str], sbd_train: list[str], sbd_val: list[str]
) -> list[str]:
    """(SBD train + SBD val + VOC train) minus VOC val, deduplicated, sorted."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


class Voc2012Aug(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 semantic segmentation with SBD's extra labels (train_aug)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = sources.manual_download_instructions((VOC, SBD))

    def _info(self) -> tfds.core.DatasetInfo:
        return sources.segmentation_info(
            self,
            description=__doc__,
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = sources.get_manual_dir(dl_manager, self.name)
        voc = sources.locate(VOC, manual_dir, dl_manager, self.name)
        sbd = sources.locate(SBD, manual_dir, dl_manager, self.name)
        voc_lists = {s: f"ImageSets/Segmentation/{s}.txt" for s in ("train", "val")}
        sbd_lists = {s: f"{s}.txt" for s in ("train", "val")}
        sources.require_files(voc, voc_lists.values(), VOC, self.name)
        sources.require_files(sbd, sbd_lists.values(), SBD, self.name)
        voc_ids = {s: sources.read_id_list(voc / p) for s, p in voc_lists.items()}
        sbd_ids = {s: sources.read_id_list(sbd / p) for s, p in sbd_lists.items()}

        def voc_example(example_id: str) -> sources.ExampleFiles:
            return sources.ExampleFiles(
                example_id,
                image=voc / "JPEGImages" / f"{example_id}.jpg",
                label=voc / "SegmentationClass" / f"{example_id}.png",
                read_label=sources.read_index_png,
            )

        def sbd_example(example_id: str) -> sources.ExampleFiles:
            return sources.ExampleFiles(
                example_id,
                image=sbd / "img" / f"{example_id}.jpg",
                label=sbd / "cls" / f"{example_id}.mat",
                read_label=_read_sbd_label,
            )

        voc_train = set(voc_ids["train"])  # train_aug holds no VOC val image.
        aug = train_aug_ids(voc_ids["train"], voc_ids["val"], sbd_ids["train"], sbd_ids["val"])
        return {
            "train_aug": self._generate_examples(
                [voc_example(i) if i in voc_train else sbd_example(i) for i in aug]
            ),
            "train": self._generate_examples([voc_example(i) for i in voc_ids["train"]]),
            "val": self._generate_examples([voc_example(i) for i in voc_ids["val"]]),
        }

    def _generate_examples(self, examples: list[sources.ExampleFiles]):
        for files in examples:
            yield files.example_id, sources.encode_example(files, len(VOC_CLASSES))


def _read_sbd_label(path: Path) -> np.ndarray:
    return sources.read_mat_labels(path, "GTcls", "Segmentation")


_CITATION = """\
@article{everingham2015pascal,
  title={The PASCAL Visual Object Classes Challenge: A Retrospective},
  author={Everingham, M. and Eslami, S. M. A. and Van Gool, L. and Williams, C. K. I. and
          Winn, J. and Zisserman, A.},
  journal={International Journal of Computer Vision}, volume={111}, number={1}, pages={98--136},
  year={2015}
}
@inproceedings{hariharan2011semantic,
  title={Semantic Contours from Inverse Detectors},
  author={Hariharan, Bharath and Arbel{\\'a}ez, Pablo and Bourdev, Lubomir and Maji, Subhransu
          and Malik, Jitendra},
  booktitle={ICCV}, year={2011}
}
"""
