"""gs:// end to end against a real Cloud Storage API server on 127.0.0.1 (tests/gcs_server.py):
the lock's create-only write, training with a bucket workdir (kill, resume, verify, damage,
fallback, second run refused), evaluation from and into the bucket, and the one-line errors.

The programs run as subprocesses with `STORAGE_EMULATOR_HOST` alone; `storage.configure` derives
every other layer's setting from it. This process sets the same variables for its own reads.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import pytest

from hemnet_jax import storage, trainer
from hemnet_jax.training import sharding
from hemnet_jax.training.checkpointing import Checkpointer
from tests.gcs_server import GcsServer
from tests.test_multiprocess import _bitwise_equal, _restore, _Run
from tests.test_train import REPO, _config, _subprocess_env, _train_cmd, read_scalars

BUCKET = "bkt"
STEPS = 8  # checkpoints every 3 steps (tests/tiny.py): 3, 6 and the final 8


@pytest.fixture(scope="module")
def gcs():
    """The server on a free port of 127.0.0.1, in memory, with one bucket; STORAGE_EMULATOR_HOST
    set (and what `storage.configure` derives from it) for the module, then the server stopped."""
    saved = dict(os.environ)
    with GcsServer() as server:
        server.create_bucket(BUCKET)
        os.environ[storage.EMULATOR_VARIABLE] = server.url
        storage.configure()
        try:
            yield server
        finally:
            os.environ.clear()
            os.environ.update(saved)


def _fs():
    import gcsfs

    return gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)


def _env(gcs, num_devices=2):
    """A subprocess's environment: the test session's, STORAGE_EMULATOR_HOST and nothing else of
    Cloud Storage (the program derives the rest)."""
    env = _subprocess_env(num_devices)
    for name in ("EPATH_USE_TF", "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
                 "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
        env.pop(name, None)
    env[storage.EMULATOR_VARIABLE] = gcs.url
    return env


def _fatal_line(result: subprocess.CompletedProcess) -> str:
    """The program's one FATAL line (asserting it failed without a traceback)."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith("FATAL: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_create_only_write_has_exactly_one_winner(gcs):
    """Eight threads race to create one object: one gets it, its bytes are what is stored;
    a conditional replace needs the current generation."""
    path = f"gs://{BUCKET}/race/object"
    results = [None] * 8
    start = threading.Barrier(8)

    def write(i):
        start.wait()
        results[i] = storage.write_if_generation(path, f"writer {i}".encode(), 0)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, g in enumerate(results) if g is not None]
    assert len(winners) == 1, results
    data, generation = storage.read_with_generation(path)
    assert data == f"writer {winners[0]}".encode() and generation == results[winners[0]]
    assert storage.write_if_generation(path, b"stale", generation + 1) is None
    assert storage.write_if_generation(path, b"next", generation) is not None
    assert storage.read_with_generation(path)[0] == b"next"


_CONTENDER = """
import sys, time
from hemnet_jax import storage
storage.configure()
from hemnet_jax.training.workdir_lock import WorkdirLockedError, workdir_lock
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
try:
    with workdir_lock(sys.argv[2]):
        print("won", flush=True)
        time.sleep(3)
except WorkdirLockedError as e:
    print("lost:", e, flush=True)
"""


@pytest.mark.heavy(seconds=15)
def test_two_runs_racing_for_the_lock_of_a_bucket_workdir(gcs):
    """Three processes take the lock of one gs:// workdir at the same instant: one wins, the
    others are refused naming it; the winner's record is gone after it ends."""
    workdir = f"gs://{BUCKET}/lock_race"
    at = time.time() + 8  # after every process has imported its modules
    procs = [subprocess.Popen([sys.executable, "-c", _CONTENDER, str(at), workdir],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(gcs), cwd=REPO) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    said = [out.strip() for out, _ in outs]
    assert sorted(s.split()[0] for s in said) == ["lost:", "lost:", "won"], outs
    assert all("is in use by another training run" in s for s in said if s.startswith("lost"))
    assert not _fs().exists(f"{BUCKET}/lock_race/train.lock")


@pytest.fixture(scope="module")
def bucket_run(gcs, tiny_data_dir, tmp_path_factory):
    """A train.py run in gs://bkt/run: stopped (SIGSTOP) while it holds the lock for a second
    train.py to be refused, SIGKILLed after its first checkpoint, resumed to the end; run from an
    empty folder. Returns (the workdir, that folder, the contender's result, the straight state)."""
    cwd = tmp_path_factory.mktemp("cwd")
    workdir = f"gs://{BUCKET}/run"
    cmd = _train_cmd(workdir, tiny_data_dir, f"--config.train.num_steps={STEPS}",
                     "--config.train.log_every=1", "--config.train.checkpoint_every=3")
    cmd[2:4] = ["--config", os.path.join(REPO, "tests/tiny.py")]
    env = _env(gcs)
    first = _Run(cmd, env)
    try:
        first.wait_for_step(1)
        first.proc.send_signal(signal.SIGSTOP)  # alive and holding the lock
        contender = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd,
                                   timeout=300)
        first.proc.send_signal(signal.SIGCONT)
        first.wait_for_step(4)  # the save of step 3 started (maybe not finished: either is fine)
        first.proc.send_signal(signal.SIGKILL)
    finally:
        first.finish(60)
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The uninterrupted reference, on local disk, on the subprocess's 2 devices.
    config = _config(tiny_data_dir, num_steps=STEPS, log_every=1, checkpoint_every=3)
    straight = trainer.train_and_evaluate(config, str(tmp_path_factory.mktemp("straight")),
                                          mesh=sharding.create_mesh(jax.devices()[:2]))
    return workdir, cwd, contender, resumed, jax.device_get(straight), config


@pytest.mark.heavy(seconds=120)
def test_training_in_a_bucket_resumes_exactly_and_falls_back(bucket_run, tmp_path):
    workdir, cwd, contender, resumed, straight, config = bucket_run
    # A second run on the same workdir was refused in one line while the first ran.
    line = _fatal_line(contender)
    assert "is in use by another training run" in line and workdir in line, line
    # The killed run's record was recognised as stale (same host, pid gone) and taken over.
    assert "Taking over the stale lock" in resumed.stderr
    # Everything is in the bucket, nothing in the local working directory.
    assert os.listdir(cwd) == []
    fs = _fs()
    names = {p.split("/", 2)[2] for p in fs.find(f"{BUCKET}/run")}
    assert {"config.json", "train.log"} <= names, names
    assert "train.lock" not in names  # released at the end
    assert any(n.startswith("events.out.tfevents.") for n in names), names
    assert json.loads(fs.cat(f"{BUCKET}/run/config.json"))["train"]["num_steps"] == STEPS
    log = fs.cat(f"{BUCKET}/run/train.log").decode()
    assert "Initialised a new run" in log and "Resumed from the checkpoint of step" in log
    # TensorBoard's events from the bucket: the resumed run logged the last step.
    local_events = tmp_path / "events"
    fs.get([f"{BUCKET}/run/{n}" for n in names if n.startswith("events")], str(local_events) + "/")
    assert STEPS in read_scalars(str(local_events), "loss")

    # The final state, read back from the bucket (digests verified), equals the straight run.
    ckpt = Checkpointer(f"{workdir}/checkpoints", read_only=True)
    assert ckpt.all_steps() == [3, 6, STEPS]
    final = _restore(workdir, config=config)
    assert int(final.step) == STEPS and _bitwise_equal(final, straight)

    # Damage in the bucket: the latest step truncated, then the next one missing an object.
    def biggest(step):
        files = fs.find(f"{BUCKET}/run/checkpoints/{step}/state")
        return max(files, key=fs.size)

    victim = biggest(STEPS)
    fs.pipe(victim, fs.cat(victim)[:100])
    restored, _ = _fallback(workdir, config)
    assert int(restored.step) == 6
    fs.rm(biggest(6))
    restored, _ = _fallback(workdir, config)
    assert int(restored.step) == 3


def _fallback(workdir, config):
    from hemnet_jax.models import create_model
    from hemnet_jax.training.state import abstract_state, optimizer_for

    model = create_model(config.model, num_classes=6)
    tx, _ = optimizer_for(config, model)
    ckpt = Checkpointer(f"{workdir}/checkpoints", read_only=True)
    return ckpt.restore(abstract_state(model, tx, sharding.create_mesh(jax.devices()[:1])),
                        config, fallback=True)


@pytest.mark.heavy(seconds=20)
def test_bucket_mistakes_end_in_one_line(gcs, tiny_data_dir, tmp_path):
    """A missing bucket, an unreachable server: one FATAL line naming the key, no traceback."""
    cmd = _train_cmd("gs://no-such-bucket/run", tiny_data_dir)
    line = _fatal_line(subprocess.run(cmd, capture_output=True, text=True, env=_env(gcs),
                                      cwd=REPO, timeout=120))
    assert "--workdir gs://no-such-bucket/run" in line and "does not exist" in line, line
    env = _env(gcs)
    env[storage.EMULATOR_VARIABLE] = f"http://127.0.0.1:{_closed_port()}"
    line = _fatal_line(subprocess.run(_train_cmd(f"gs://{BUCKET}/x", tiny_data_dir),
                                      capture_output=True, text=True, env=env, cwd=REPO,
                                      timeout=120))
    assert "--workdir" in line and "cannot reach" in line, line


def _closed_port() -> int:
    from tests.gcs_server import free_port

    return free_port()
