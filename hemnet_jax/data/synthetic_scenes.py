"""TFDS builder `synthetic_scenes`: procedurally generated segmentation, no download needed.

Five object classes, each with its own shape and texture (striped disc, checkered square, dotted
triangle, solid cross, hatched ring), on cluttered textured backgrounds; colours are shared by
all classes and the clutter, so colour alone cannot solve it (see `scenes.py`). Class 0 is the
background. Deterministic from the config's seed; builds in seconds.

Configs (`scenes.PRESETS`): default (64x64, 512 train / 128 val, the CPU demo of
configs/synthetic.py), tiny (32x32, 48 / 16: tests, smoke runs), large (375x500 JPEGs like VOC's,
192 / 48: the input pipeline benchmark). Build: `tfds build hemnet_jax/data/synthetic_scenes.py
--config default`, or let `make_train_dataset(name="synthetic_scenes", ...)` build it.
"""

import dataclasses

import tensorflow_datasets as tfds

from hemnet_jax.data import scenes, sources


@dataclasses.dataclass(eq=False)
class SyntheticScenesConfig(tfds.core.BuilderConfig):
    """spec: scene size, split sizes and seed; image_format: "png" (lossless) or "jpeg"."""

    spec: scenes.SceneSpec = scenes.SceneSpec()
    image_format: str = "png"


def _config(name: str, image_format: str = "png") -> SyntheticScenesConfig:
    spec = scenes.PRESETS[name]
    return SyntheticScenesConfig(
        name=name,
        description=(
            f"{spec.height}x{spec.width} {image_format.upper()} images, "
            f"{spec.num_train} train / {spec.num_val} val, seed {spec.seed}."
        ),
        spec=spec,
        image_format=image_format,
    )


class SyntheticScenes(tfds.core.GeneratorBasedBuilder):
    """Procedural scenes of textured shapes on clutter (embedded demo dataset)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [_config("default"), _config("tiny"), _config("large", "jpeg")]

    def _info(self) -> tfds.core.DatasetInfo:
        return sources.segmentation_info(
            self,
            description=__doc__,
            image_format=self.builder_config.image_format,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        spec = self.builder_config.spec
        return {
            "train": self._generate_examples("train", spec.num_train),
            "val": self._generate_examples("val", spec.num_val),
        }

    def _generate_examples(self, split: str, count: int):
        spec = self.builder_config.spec
        for index in range(count):
            image, label = scenes.render(spec, split, index)
            example_id = f"{split}_{index:06d}"
            yield example_id, {"image": image, "label": label[..., None], "id": example_id}
