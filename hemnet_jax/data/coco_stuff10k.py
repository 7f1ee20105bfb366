"""TFDS builder `coco_stuff10k`: COCO-Stuff 10k v1.1, 171 classes.

Source: cocostuff-10k-v1.1.zip: images/<id>.jpg, annotations/<id>.mat (variable `S`: 0 =
unlabelled, 1-91 COCO thing ids of which 80 are used, 92-182 the 91 stuff classes),
imageLists/{train,test}.txt. Splits: train 9,000, test 1,000 on the real data.
Labels: the 171 used ids in increasing order become 0..170 (`classes.COCO_STUFF_USED_IDS[k]` is
the source id of class k: person 1 -> 0, ..., toothbrush 90 -> 79, banner 92 -> 80, ...,
wood 182 -> 170); unlabelled (0) and the 11 unused thing ids (12, 26, 29, 30, 45, 66, 68, 69,
71, 83, 91) become 255.

Build: `tfds build hemnet_jax/data/coco_stuff10k.py --manual_dir DIR`.
"""

import functools
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from hemnet_jax.data import classes, sources

COCO_STUFF_10K = sources.Download(
    archive="cocostuff-10k-v1.1.zip",
    url="http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
    "cocostuff-10k-v1.1.zip",
    roots=("", "cocostuff-10k-v1.1", "dataset"),
    marker="imageLists",
    description="COCO-Stuff 10k v1.1, images and .mat annotations (2.0 GB)",
)


class CocoStuff10k(tfds.core.GeneratorBasedBuilder):
    """COCO-Stuff 10k (v1.1) semantic segmentation, 171 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = sources.manual_download_instructions((COCO_STUFF_10K,))

    def _info(self) -> tfds.core.DatasetInfo:
        return sources.segmentation_info(
            self,
            description=__doc__,
            homepage="https://github.com/nightrome/cocostuff10k",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = sources.get_manual_dir(dl_manager, self.name)
        root = sources.locate(COCO_STUFF_10K, manual_dir, dl_manager, self.name)
        lists = {s: f"imageLists/{s}.txt" for s in ("train", "test")}
        sources.require_files(root, lists.values(), COCO_STUFF_10K, self.name)
        read_label = functools.partial(_read_coco_stuff_label, lut=classes.coco_stuff_lut())
        return {
            split: self._generate_examples(
                [
                    sources.ExampleFiles(
                        example_id,
                        image=root / "images" / f"{example_id}.jpg",
                        label=root / "annotations" / f"{example_id}.mat",
                        read_label=read_label,
                    )
                    for example_id in sources.read_id_list(root / list_file)
                ]
            )
            for split, list_file in lists.items()
        }

    def _generate_examples(self, examples: list[sources.ExampleFiles]):
        for files in examples:
            yield files.example_id, sources.encode_example(files, len(classes.COCO_STUFF_CLASSES))


def _read_coco_stuff_label(path: Path, lut: list[int]) -> np.ndarray:
    return sources.remap(sources.read_mat_labels(path, "S"), lut, path)


_CITATION = """\
@inproceedings{caesar2018coco,
  title={COCO-Stuff: Thing and Stuff Classes in Context},
  author={Caesar, Holger and Uijlings, Jasper and Ferrari, Vittorio},
  booktitle={CVPR}, year={2018}
}
"""
