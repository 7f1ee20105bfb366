"""Datasets and input pipelines of hemnet_jax (docs/datasets.md).

The registry (`get_dataset_info`) is light and imports no TensorFlow; the pipeline
(`data.pipeline`) and the builders (`data.prepare`, `data.builders`) do. Importing
`hemnet_jax.data.builders` registers the TFDS builders.
"""

from hemnet_jax import _compat
from hemnet_jax.data.datasets import DatasetInfo, dataset_names, get_dataset_info

__all__ = ["DatasetInfo", "dataset_names", "get_dataset_info"]

# Until 0.2 these were loaded lazily from here; import them from their modules.
__getattr__ = _compat.moved_attributes(
    __name__,
    {
        "make_train_dataset": "hemnet_jax.data.pipeline",
        "make_eval_dataset": "hemnet_jax.data.pipeline",
        "prepare_dataset": "hemnet_jax.data.prepare",
    },
)
