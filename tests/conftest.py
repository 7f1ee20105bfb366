"""Test-wide setup: 8 simulated CPU devices for sharding tests, TensorFlow kept off accelerators.

XLA_FLAGS must be set before JAX initialises its backends, so this runs before any test imports jax.
"""

import os
import shutil

# The tests compile hundreds of small programs and run each a few times: XLA's CPU backend
# without LLVM's optimisations compiles in about half the CPU time (test_eight_devices_equal_one:
# 65 s -> 31 s of CPU, measured), and with its older elemental emitters instead of the MLIR fusion
# emitters in about half again (the tiny train step: 3.6 s -> 1.6 s to compile, its init 2.9 s ->
# 1.9 s; running them took the same time). The older emitters round a few results differently
# (an exp, a sum: 1 ulp): tests whose claim is bit-level take the `default_cpu_emitters` fixture.
# Subprocesses get these flags too, with their own device count (tests/test_train.py's
# _subprocess_env).
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
              "--xla_cpu_use_fusion_emitters=false"):
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

from hemnet_jax import cli  # noqa: E402  (neither JAX nor TensorFlow: the controller loads it)

# As every program does at its start (hemnet_jax/cli.py): the workers trace hundreds of programs.
cli.collect_garbage_less_often()


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
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def shared_build(tmp_path_factory, name: str, build) -> str:
    """The folder `name`, made by `build(path)` once for the whole run: in the temporary folder
    that both xdist workers share, under a file lock, so that the second worker waits for the
    first one's build and reuses it. Users must not write into it (copy it first)."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # .../pytest-N/popen-gwK -> .../pytest-N, the workers' common folder
    path = base / f"shared_{name}"
    with open(base / f"shared_{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (base / f"shared_{name}.built").exists():
            shutil.rmtree(path, ignore_errors=True)  # a build that failed half-way
            path.mkdir()
            build(path)
            (base / f"shared_{name}.built").touch()
    return str(path)


@pytest.fixture
def default_cpu_emitters(monkeypatch):
    """The test compiles with XLA's default CPU fusion emitters, which this suite's XLA_FLAGS
    turn off to compile faster: for claims that hold to the bit, or at the edge of a float32
    tolerance, on the compiler users run. Programs this worker compiled before are dropped
    first, so that none is reused; the compilation cache keys on these options. (Those compiled
    here may serve later tests: every other test holds with either emitters.) It patches a
    private JAX function: were it bypassed after an upgrade, these tests would fail, not pass
    on the wrong compiler (measured, with the older emitters: the initialisation differs by
    1 ulp between meshes, the last E-step share of eq. 18's test is 5e-14 to 8e-13 instead of
    0, and one head-hem logit is 1.07e-5 from PyTorch's where 1.04e-5 is allowed)."""
    import jax
    from jax._src import compiler

    get_compile_options = compiler.get_compile_options

    def with_default_emitters(*args, env_options_overrides=None, **kwargs):
        overrides = {**(env_options_overrides or {}), "xla_cpu_use_fusion_emitters": True}
        return get_compile_options(*args, env_options_overrides=overrides, **kwargs)

    jax.clear_caches()
    monkeypatch.setattr(compiler, "get_compile_options", with_default_emitters)
    yield
    monkeypatch.undo()


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A TFDS data_dir with the embedded `synthetic_scenes/tiny` built, once for both workers.
    Read-only: tests read it, none builds anything else into it."""
    # Project imports in the fixtures: the xdist controller loads this file too and needs
    # neither JAX nor TensorFlow.
    from hemnet_jax.data import prepare

    return shared_build(tmp_path_factory, "tfds", lambda path: prepare.prepare_dataset(
        "synthetic_scenes/tiny", data_dir=str(path)))


@pytest.fixture(scope="session")
def tiny_run(tiny_data_dir, tmp_path_factory) -> str:
    """A workdir (read-only: copy it to write) of the tiny config (tests/tiny.py) with
    `num_steps=12`, trained for 2 steps by the training loop on one device and stopped as a
    preemption stops it: its only checkpoint is step 2. Trained once for both workers; test_eval
    evaluates it, test_train resumes it."""
    import jax

    from hemnet_jax import trainer
    from hemnet_jax.training import sharding
    from tests.tiny import TINY_RUN_NUM_STEPS, TINY_RUN_STEPS, tiny_config

    def train(path):
        config = tiny_config()
        config.data.data_dir = tiny_data_dir
        config.train.num_steps = TINY_RUN_NUM_STEPS
        state = trainer.train_and_evaluate(config, str(path), stop_after=TINY_RUN_STEPS,
                                           mesh=sharding.create_mesh(jax.devices()[:1]))
        assert int(state.step) == TINY_RUN_STEPS

    return shared_build(tmp_path_factory, "tiny_run", train)


@pytest.fixture(scope="module")
def gcs():
    """A Cloud Storage API server on a free port of 127.0.0.1 (tests/gcs_server.py), in memory,
    with the bucket `tests.bucket.BUCKET`; STORAGE_EMULATOR_HOST set (and what
    `storage.configure` derives from it) for the module, then the server stopped."""
    from hemnet_jax import storage
    from tests.bucket import BUCKET
    from tests.gcs_server import GcsServer, TlsProxy

    saved = dict(os.environ)
    with GcsServer() as server:
        server.create_bucket(BUCKET)
        server.proxy = TlsProxy(server.port)  # for TensorFlow's reads (tests/gcs_server.py)
        os.environ[storage.EMULATOR_VARIABLE] = server.url
        storage.configure()
        try:
            yield server
        finally:
            server.proxy.close()
            os.environ.clear()
            os.environ.update(saved)
