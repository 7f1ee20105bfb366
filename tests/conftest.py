"""Test-wide setup: 8 simulated CPU devices for sharding tests, TensorFlow kept off accelerators.

XLA_FLAGS must be set before JAX initialises its backends, so this runs before any test imports jax.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A TFDS data_dir with the embedded `synthetic_scenes/tiny` built (seconds), per worker."""
    from hemnet_jax.data import prepare

    data_dir = tmp_path_factory.mktemp("tfds")
    prepare.prepare_dataset("synthetic_scenes/tiny", data_dir=str(data_dir))
    return str(data_dir)
