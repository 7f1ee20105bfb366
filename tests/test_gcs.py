"""gs:// end to end against a real Cloud Storage API server on 127.0.0.1 (tests/gcs_server.py):
the lock's create-only write, training with a bucket workdir (kill, resume, verify, damage,
fallback, second run refused), evaluation from and into the bucket, and the one-line errors.

The programs run as subprocesses with `STORAGE_EMULATOR_HOST` alone; `storage.configure` derives
every other layer's setting from it. This process sets the same variables for its own reads.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from hemnet_jax import storage
from hemnet_jax.training import sharding
from hemnet_jax.training.checkpointing import Checkpointer
from tests.bucket import BUCKET, bucket_env, bucket_fs
from tests.test_multiprocess import _bitwise_equal, _restore, _Run
from tests.test_train import REPO, _config, _train_cmd, read_scalars

STEPS = 8  # a checkpoint every step, the last 3 kept: 6, 7, 8 at the end


@pytest.fixture(scope="module")
def bucket_data_dir(gcs, tiny_data_dir):
    """The TFDS data_dir of synthetic_scenes/tiny, built locally and copied to the bucket."""
    bucket_fs().put(tiny_data_dir, f"{BUCKET}/tfds", recursive=True)
    return f"gs://{BUCKET}/tfds"


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
                              env=bucket_env(gcs), cwd=REPO) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    said = [out.strip() for out, _ in outs]
    assert sorted(s.split()[0] for s in said) == ["lost:", "lost:", "won"], outs
    assert all("is in use by another training run" in s for s in said if s.startswith("lost"))
    assert not bucket_fs().exists(f"{BUCKET}/lock_race/train.lock")


@pytest.fixture(scope="module")
def bucket_run(gcs, tiny_data_dir, bucket_data_dir, tmp_path_factory):
    """A train.py run in gs://bkt/run on the data in the bucket: stopped (SIGSTOP) while it holds
    the lock for a second train.py to be refused, SIGKILLed after its first checkpoint, resumed
    to the end; run from an empty folder. The same run straight, on local disk and local data,
    alongside. Returns (workdir, that folder, the contender's and the resumed run's results,
    the straight state, the config)."""
    cwd = tmp_path_factory.mktemp("cwd")
    workdir = f"gs://{BUCKET}/run"
    cmd = _train_cmd(workdir, bucket_data_dir, f"--config.train.num_steps={STEPS}",
                     "--config.train.log_every=1", "--config.train.checkpoint_every=1")
    cmd[2:4] = ["--config", os.path.join(REPO, "tests/tiny.py")]
    env = bucket_env(gcs)
    # The uninterrupted reference: the same command into a local workdir, alongside.
    local = str(tmp_path_factory.mktemp("straight"))
    straight = subprocess.Popen([*cmd[:4], "--workdir", local,
                                 f"--config.data.data_dir={tiny_data_dir}", *cmd[7:]],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=REPO)
    first = _Run(cmd, env)
    try:
        first.wait_for_step(1)
        first.proc.send_signal(signal.SIGSTOP)  # alive and holding the lock
        contender = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd,
                                   timeout=300)
        first.proc.send_signal(signal.SIGCONT)
        # Step 4's save waited for step 3's to be committed: a checkpoint to resume from.
        first.wait_for_step(5)
        first.proc.send_signal(signal.SIGKILL)
    finally:
        first.finish(60)
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-3000:]
    config = _config(tiny_data_dir, num_steps=STEPS, log_every=1, checkpoint_every=1)
    return workdir, cwd, contender, resumed, _restore(local, config=config), config


@pytest.mark.heavy(seconds=150)
def test_training_in_a_bucket_then_evaluating_it(bucket_run, gcs, bucket_data_dir, tmp_path):
    """One run in the bucket (`bucket_run`, module-scoped but used here alone: xdist would build
    it once per worker) serves both checks: the training's, then evaluation and prediction from
    the bucket's checkpoint."""
    for name in ("training", "evaluation"):
        (tmp_path / name).mkdir()
    _check_training(bucket_run, tmp_path / "training")
    _check_evaluation(bucket_run, gcs, bucket_data_dir, tmp_path / "evaluation")


def _check_training(bucket_run, tmp_path):
    """Refusal, takeover of the stale lock, everything in the bucket, exact resumption, and a
    fallback past damaged steps (in a copy of the run)."""
    workdir, cwd, contender, resumed, straight, config = bucket_run
    # A second run on the same workdir was refused in one line while the first ran.
    line = _fatal_line(contender)
    assert "is in use by another training run" in line and workdir in line, line
    # The killed run's record was recognised as stale (same host, pid gone) and taken over.
    assert "Taking over the stale lock" in resumed.stderr
    # Everything is in the bucket, nothing in the local working directory.
    assert os.listdir(cwd) == []
    fs = bucket_fs()
    names = {p.split("/", 2)[2] for p in fs.find(f"{BUCKET}/run")}
    assert {"config.json", "train.log"} <= names, names
    assert "train.lock" not in names  # released at the end
    assert any(n.startswith("events.out.tfevents.") for n in names), names
    assert json.loads(fs.cat(f"{BUCKET}/run/config.json"))["train"]["num_steps"] == STEPS
    log = fs.cat(f"{BUCKET}/run/train.log").decode()
    assert "Initialised a new run" in log, log
    assert re.search(r"Resumed from the checkpoint of step [3-7] in gs://bkt/run", log), log
    # TensorBoard's events from the bucket: the resumed run logged the last step.
    local_events = tmp_path / "events"
    fs.get([f"{BUCKET}/run/{n}" for n in names if n.startswith("events")], str(local_events) + "/")
    assert STEPS in read_scalars(str(local_events), "loss")

    # The final state, read back from the bucket (digests verified), equals the straight run's
    # on local disk and local data: the data read from the bucket was the same too.
    ckpt = Checkpointer(f"{workdir}/checkpoints", read_only=True)
    assert ckpt.all_steps() == [6, 7, STEPS]
    final = _restore(workdir, config=config)
    assert int(final.step) == STEPS and _bitwise_equal(final, straight)

    # Damage in the bucket (a copy of the run): the latest step truncated, then the next one
    # missing an object.
    fs.copy(f"{BUCKET}/run", f"{BUCKET}/damaged", recursive=True)
    workdir = f"gs://{BUCKET}/damaged"

    def biggest(step):
        files = fs.find(f"{BUCKET}/damaged/checkpoints/{step}/state")
        return max(files, key=fs.size)

    victim = biggest(STEPS)
    fs.pipe(victim, fs.cat(victim)[:100])
    restored, _ = _fallback(workdir, config)
    assert int(restored.step) == 7
    fs.rm(biggest(7))
    # As a resuming run restores: the steps that fail are moved aside, in the bucket.
    restored, _ = _fallback(workdir, config, quarantine=True)
    assert int(restored.step) == 6
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/damaged/rejected_checkpoints")) \
        == ["7", str(STEPS)]
    assert Checkpointer(f"{workdir}/checkpoints", read_only=True).all_steps() == [6]


def _fallback(workdir, config, quarantine=False):
    from hemnet_jax.models import create_model
    from hemnet_jax.training.state import abstract_state, optimizer_for

    model = create_model(config.model, num_classes=6)
    tx, _ = optimizer_for(config, model)
    ckpt = Checkpointer(f"{workdir}/checkpoints", read_only=not quarantine)
    return ckpt.restore(abstract_state(model, tx, sharding.create_mesh(jax.devices()[:1])),
                        config, fallback=True, quarantine=quarantine)


def _check_evaluation(bucket_run, gcs, bucket_data_dir, tmp_path):
    """eval.py writes its JSON into the bucket; the same evaluation in-process into a local
    folder agrees; the gradient study and predict read the bucket's checkpoint."""
    from PIL import Image

    from hemnet_jax.evaluation import predict, runner
    from hemnet_jax.models import create_model
    from hemnet_jax.studies import gradient_flow
    from hemnet_jax.training.state import restore_for_eval

    workdir, config = bucket_run[0], bucket_run[5]
    result = subprocess.run(
        [sys.executable, "eval.py", "--config", "tests/tiny.py", "--workdir", workdir,
         "--output_dir", f"gs://{BUCKET}/evals", f"--config.data.data_dir={bucket_data_dir}",
         "--config.eval.max_batches=1"],
        capture_output=True, text=True, env=bucket_env(gcs), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fs = bucket_fs()
    [written] = fs.find(f"{BUCKET}/evals/eval")
    in_bucket = json.loads(fs.cat(written))
    assert in_bucket["step"] == STEPS and in_bucket["checkpoint"].startswith(workdir)
    # config: local data (this process's TensorFlow has no proxy); the same numbers.
    local = runner.evaluate(config, workdir=workdir, output_dir=str(tmp_path / "out"))
    assert os.path.isfile(local["json"]) and local["json"].startswith(str(tmp_path))
    assert local["results"][0]["miou"] == pytest.approx(in_bucket["results"][0]["miou"])

    # The gradient study reads the bucket's checkpoint too.
    model = create_model(config.model, num_classes=6)
    _, step = gradient_flow.load_variables(config, model, workdir,
                                           sharding.create_mesh(jax.local_devices()[:1]))
    assert step == STEPS

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8)).save(
        images / "a.png")
    restored = restore_for_eval(config, workdir=workdir,
                                mesh=sharding.create_mesh(jax.local_devices()[:1]))
    assert restored.step == STEPS
    segment = predict.make_segmenter(restored.model, restored.variables, config)
    [(mask, _)] = predict.predict_folder(segment, images, tmp_path / "masks")
    assert np.asarray(Image.open(mask)).shape == (40, 48)


@pytest.mark.heavy(seconds=20)
def test_bucket_mistakes_end_in_one_line(gcs, tiny_data_dir, tmp_path):
    """A missing bucket, an unreachable server: one FATAL line naming the key, no traceback."""
    cmd = _train_cmd("gs://no-such-bucket/run", tiny_data_dir)
    line = _fatal_line(subprocess.run(cmd, capture_output=True, text=True, env=bucket_env(gcs),
                                      cwd=REPO, timeout=120))
    assert "--workdir gs://no-such-bucket/run" in line and "does not exist" in line, line
    env = bucket_env(gcs)
    env[storage.EMULATOR_VARIABLE] = f"http://127.0.0.1:{_closed_port()}"
    line = _fatal_line(subprocess.run(_train_cmd(f"gs://{BUCKET}/x", tiny_data_dir),
                                      capture_output=True, text=True, env=env, cwd=REPO,
                                      timeout=120))
    assert "--workdir" in line and "cannot reach" in line, line


def _closed_port() -> int:
    from tests.gcs_server import free_port

    return free_port()


@pytest.mark.heavy(seconds=30)
def test_programs_that_cannot_take_a_bucket_path_refuse_it(gcs, tiny_data_dir, tmp_path):
    """One FATAL line naming the program (where it is the program's limit) and the key, before
    any work; run side by side. Also a missing object and TensorFlow's limits."""
    runs = {
        ("hemnet_jax.evaluation.predict", "--images"): [
            "-m", "hemnet_jax.evaluation.predict", "--config", "tests/tiny.py",
            "--workdir", f"gs://{BUCKET}/run", "--images", f"gs://{BUCKET}/images",
            "--output", str(tmp_path / "masks")],
        ("hemnet_jax.studies.ablation", "--root"): [
            "-m", "hemnet_jax.studies.ablation", "--config", "tests/tiny.py",
            "--root", f"gs://{BUCKET}/ablation", "--grid", "model.num_iters=1,2"],
        ("hemnet_jax.studies.gradient_flow", "--output_dir"): [
            "-m", "hemnet_jax.studies.gradient_flow", "--config", "tests/tiny.py",
            "--workdir", f"gs://{BUCKET}/run"],
        # Without the proxy, TensorFlow cannot read from the server; with it, not write.
        ("data.data_dir", "TensorFlow, which ignores"): [
            "train.py", "--config", "tests/tiny.py", "--workdir", str(tmp_path / "w"),
            f"--config.data.data_dir=gs://{BUCKET}/tfds"],
        ("--checkpoint", "no such directory"): [  # a missing object (prefix) in the bucket
            "eval.py", "--config", "tests/tiny.py", "--checkpoint",
            f"gs://{BUCKET}/no_run/checkpoints/5"],
        ("--data_dir", "TensorFlow, which cannot write"): [
            "-m", "hemnet_jax.data.prepare", "synthetic_scenes/tiny", "--data_dir",
            f"gs://{BUCKET}/built_here"],
    }
    env = bucket_env(gcs, tensorflow=False)
    procs = {words: subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for words, args in runs.items()}
    for words, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        line = _fatal_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        assert all(w in line for w in words), line
    assert not os.path.exists(tmp_path / "masks") and not os.path.exists(tmp_path / "w")


@pytest.mark.heavy(seconds=25)
def test_import_emanet_into_a_bucket_workdir(gcs, tmp_path):
    """`weights import-emanet FILE --workdir gs://...` (the real CLI): the bucket's checkpoint
    computes what the PyTorch network computes."""
    import torch

    from tests.test_import_official import (
        _assert_same_logits,
        _config,
        _emanet_overrides,
        _images,
        _torch_net,
    )

    emanet = _emanet_overrides()
    config = _config(**emanet)
    net = _torch_net(config)
    path = tmp_path / "step_1234.pth"
    torch.save({"net": net.state_dict(), "step": 1234}, path)
    workdir = f"gs://{BUCKET}/imported"
    done = subprocess.run(
        [sys.executable, "-m", "hemnet_jax.models.weights", "import-emanet", str(path),
         "--config", "tests/tiny.py", "--workdir", workdir,
         *(f"--config.model.{k}={v}" for k, v in emanet.items())],
        cwd=REPO, env=bucket_env(gcs, 1), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    restored = _assert_same_logits(config, workdir, net, _images())
    assert restored.step == 1234 and restored.path == f"{workdir}/checkpoints/1234"
