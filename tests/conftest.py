"""Test-wide setup: 8 simulated CPU devices for sharding tests, TensorFlow kept off accelerators.

XLA_FLAGS must be set before JAX initialises its backends, so this runs before any test imports jax.
"""

import os

# The tests compile hundreds of small programs and run each a few times: XLA's CPU backend
# without LLVM's optimisations compiles in about half the CPU time (test_eight_devices_equal_one:
# 65 s -> 31 s of CPU, measured), and what the tests check holds the same. Subprocesses get these
# flags too, with their own device count (tests/test_train.py's _subprocess_env).
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, its subprocesses (train.py, eval.py, two-process
# runs) and both xdist workers: a program compiled once is loaded from disk after that.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hemnet_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# As every program sets at start-up (hemnet_jax/storage.py): epath reaches gs:// through gcsfs.
# etils reads it once, at the first path it opens, so before anything is imported.
os.environ.setdefault("EPATH_USE_TF", "false")


import pytest  # noqa: E402  (after the environment is set)


def pytest_collection_modifyitems(items):
    """Tests marked `heavy` (real training runs, subprocesses: tens of seconds each) first, so
    that the xdist workers share them out instead of one ending the run alone with them: the
    workers take tests one at a time (`--maxschedchunk=1`, pyproject.toml), longest first."""
    def seconds(item) -> float:
        marker = item.get_closest_marker("heavy")
        return marker.kwargs.get("seconds", 1) if marker else 0

    items.sort(key=seconds, reverse=True)  # stable: the others keep their order


def pytest_sessionfinish(session):
    """The controller (not an xdist worker) removes the compilation cache it made."""
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A TFDS data_dir with the embedded `synthetic_scenes/tiny` built (seconds), per worker."""
    from hemnet_jax.data import prepare

    data_dir = tmp_path_factory.mktemp("tfds")
    prepare.prepare_dataset("synthetic_scenes/tiny", data_dir=str(data_dir))
    return str(data_dir)
