"""TFDS builder `pascal_context`: PASCAL-Context, the 59-class (or 60-class) benchmark.

Images: PASCAL VOC 2010 trainval. Labels: the official full annotation (trainval.tar.gz from the
PASCAL-Context site: trainval/<id>.mat, variable `LabelMap`, uint16 ids 1..459 of its labels.txt,
0 = unlabelled; its trainval/ folder may sit in manual_dir or in VOCdevkit/VOC2010/), reduced to
the standard 59 classes (`classes.CONTEXT_59`).
Splits (VOC 2010 ImageSets/Main): train 4,998, val 5,105 on the real data.

Configs:
  59 (default): classes 0..58; unlabelled and the other 400 classes are 255 (ignored), the
    convention of the papers' 59-class mIoU (HEMNet, EMANet).
  60: 0 = background (unlabelled and the other 400 classes), the 59 classes 1..59.

Build: `tfds build hemnet_jax/data/pascal_context.py --config 59 --manual_dir DIR`.
"""

import dataclasses
import functools
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from hemnet_jax.data import classes, sources

VOC2010 = sources.Download(
    archive="VOCtrainval_03-May-2010.tar",
    url="http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
    roots=("VOCdevkit/VOC2010", "VOCtrainval_03-May-2010/VOCdevkit/VOC2010"),
    marker="ImageSets/Main",
    description="PASCAL VOC 2010 trainval (1.3 GB), the images",
)
CONTEXT = sources.Download(
    archive="trainval.tar.gz",
    url="https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz",
    roots=("", "VOCdevkit/VOC2010", "pascal-context"),
    marker="trainval",
    description="PASCAL-Context full annotations, trainval/<id>.mat with LabelMap (30 MB)",
)


@dataclasses.dataclass(eq=False)
class PascalContextConfig(tfds.core.BuilderConfig):
    """with_background: 60-class convention (0 = background) instead of 59 (background = 255)."""

    with_background: bool = False


class PascalContext(tfds.core.GeneratorBasedBuilder):
    """PASCAL-Context semantic segmentation, 59 classes (or 60 with background)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        PascalContextConfig(name="59", description="59 classes, background ignored (255)."),
        PascalContextConfig(
            name="60", description="60 classes, 0 = background.", with_background=True
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = sources.manual_download_instructions((VOC2010, CONTEXT))

    @property
    def num_classes(self) -> int:
        return 60 if self.builder_config.with_background else 59

    def _info(self) -> tfds.core.DatasetInfo:
        return sources.segmentation_info(
            self,
            description=__doc__,
            homepage="https://cs.stanford.edu/~roozbeh/pascal-context/",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = sources.get_manual_dir(dl_manager, self.name)
        voc = sources.locate(VOC2010, manual_dir, dl_manager, self.name)
        context = sources.locate(CONTEXT, manual_dir, dl_manager, self.name)
        lists = {s: f"ImageSets/Main/{s}.txt" for s in ("train", "val")}
        sources.require_files(voc, lists.values(), VOC2010, self.name)
        read_label = functools.partial(
            _read_context_label, lut=classes.context_lut(self.builder_config.with_background)
        )
        splits = {}
        for split, list_file in lists.items():
            examples = [
                sources.ExampleFiles(
                    example_id,
                    image=voc / "JPEGImages" / f"{example_id}.jpg",
                    label=context / "trainval" / f"{example_id}.mat",
                    read_label=read_label,
                )
                for example_id in sources.read_id_list(voc / list_file)
            ]
            splits[split] = self._generate_examples(examples)
        return splits

    def _generate_examples(self, examples: list[sources.ExampleFiles]):
        for files in examples:
            yield files.example_id, sources.encode_example(files, self.num_classes)


def _read_context_label(path: Path, lut: list[int]) -> np.ndarray:
    return sources.remap(sources.read_mat_labels(path, "LabelMap"), lut, path)


_CITATION = """\
@inproceedings{mottaghi2014role,
  title={The Role of Context for Object Detection and Semantic Segmentation in the Wild},
  author={Mottaghi, Roozbeh and Chen, Xianjie and Liu, Xiaobai and Cho, Nam-Gyu and Lee,
          Seong-Whan and Fidler, Sanja and Urtasun, Raquel and Yuille, Alan},
  booktitle={CVPR}, year={2014}
}
"""
