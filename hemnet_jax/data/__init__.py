"""Datasets and input pipelines of hemnet_jax (docs/datasets.md).

The registry (`get_dataset_info`) is light; the pipeline functions import TensorFlow on first
use. Importing `hemnet_jax.data.builders` registers the TFDS builders.
"""

import importlib
from typing import Any

from hemnet_jax.data.datasets import DatasetInfo, dataset_names, get_dataset_info

_LAZY = {
    "make_train_dataset": "hemnet_jax.data.pipeline",
    "make_eval_dataset": "hemnet_jax.data.pipeline",
    "prepare_dataset": "hemnet_jax.data.prepare",
}

__all__ = ["DatasetInfo", "dataset_names", "get_dataset_info", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
