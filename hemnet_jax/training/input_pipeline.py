"""The config's dataset as this process's share of each global batch (tf.data on the host).

`prepare_data` builds the dataset once per folder before any process reads it; `train_batches`
and `evaluation.validation.eval_batches` feed the jitted steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import ml_collections
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hemnet_jax.data import datasets, pipeline, prepare, tf_devices
from hemnet_jax.training import sharding


def data_dirs(config: ml_collections.ConfigDict) -> dict[str, str | None]:
    """TFDS's data_dir and manual_dir of `config.data` ("" means TFDS's default: None)."""
    return {"data_dir": config.data.data_dir or None, "manual_dir": config.data.manual_dir or None}


def prepare_data(config: ml_collections.ConfigDict) -> None:
    """Builds the dataset if it is not built yet: process 0 first, then (where hosts do not share
    the data_dir) each other process, so no two processes build into one folder at once.

    TensorFlow (TFDS's and tf.data's) loads here, quietly and kept off accelerators: training and
    evaluation call this once their checks have passed, so a run that stops at a mistake or at
    a held workdir lock never waits for it (3-8 s)."""
    tf_devices.tensorflow()
    if jax.process_index() == 0:
        prepare.prepare_dataset(config.data.name, **data_dirs(config))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("hemnet_jax: dataset prepared by process 0")
        if jax.process_index() != 0:
            prepare.prepare_dataset(config.data.name, **data_dirs(config))


def train_batches(config: ml_collections.ConfigDict, mesh: Mesh, start_step: int) -> Iterator:
    """This process's share of each global training batch, from `start_step` on."""
    info = datasets.get_dataset_info(config.data.name)
    ds = pipeline.make_train_dataset(
        name=info.name,
        split=config.data.train_split or info.train_split,
        per_process_batch_size=sharding.per_process_batch_size(config.train.batch_size, mesh),
        crop_size=config.data.crop_size,
        scales=tuple(config.data.scales),
        seed=config.seed,
        start_step=start_step,
        shuffle_buffer=config.data.shuffle_buffer,
        **data_dirs(config),
    )
    return ds.as_numpy_iterator()
