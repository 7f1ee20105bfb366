"""train.py end to end: exact resumption, SIGTERM, loss going down, bad keys (two processes:
test_multiprocess.py).

The tiny config (tests/tiny.py) runs the real code paths: the TFDS builder of the embedded
dataset, the tf.data pipeline, the jitted sharded step, orbax checkpoints and clu writers.
"""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from hemnet_jax import hem_diagnostics, trainer
from hemnet_jax.cli import load_config_file
from hemnet_jax.models import create_model
from hemnet_jax.training import sharding
from hemnet_jax.training.checkpointing import Checkpointer
from hemnet_jax.training.state import abstract_state, optimizer_for
from tests.tiny import TINY_RUN_NUM_STEPS, TINY_RUN_STEPS, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, **train):
    config = tiny_config()
    config.data.data_dir = data_dir
    config.eval.max_batches = 1
    config.train.update(train)
    return config


def _assert_trees_close(a, b, rtol, what=""):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) and leaves_a
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol, err_msg=what)


def read_scalars(workdir: str, tag: str) -> dict[int, float]:
    """The values clu's TensorBoard writer logged under `tag`, by step."""
    values = {}
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.tag == tag:
                    values[event.step] = float(tf.make_ndarray(v.tensor))
    return values


def _subprocess_env(num_devices: int) -> dict[str, str]:
    """The test session's environment (conftest.py) for a subprocess on `num_devices` devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+",
                              f"--xla_force_host_platform_device_count={num_devices}",
                              env.get("XLA_FLAGS", ""))
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO
    return env


def _train_cmd(workdir, data_dir, *extra):
    return [
        sys.executable,
        os.path.join(REPO, "train.py"),
        "--config",
        "tests/tiny.py",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        "--config.eval.max_batches=1",
        *extra,
    ]


@pytest.mark.heavy(seconds=30)
def test_resume_continues_exactly(tiny_data_dir, tiny_run, tmp_path):
    """12 steps straight equal 2 steps, an interruption, a resume, 10 more steps: the first two
    and the interruption are conftest's `tiny_run` (same config, same single device)."""
    n = TINY_RUN_NUM_STEPS
    config = _config(tiny_data_dir, num_steps=n, checkpoint_every=100, validate_at_end=True)
    one_device = sharding.create_mesh(jax.devices()[:1])
    straight = trainer.train_and_evaluate(config, str(tmp_path / "straight"), mesh=one_device)
    interrupted = str(tmp_path / "interrupted")
    shutil.copytree(tiny_run, interrupted)
    assert Checkpointer(f"{interrupted}/checkpoints", read_only=True).latest_step() == (
        TINY_RUN_STEPS)
    resumed = trainer.train_and_evaluate(config, interrupted, mesh=one_device)
    assert int(resumed.step) == int(straight.step) == n
    for name in ("params", "opt_state", "batch_stats", "bases"):
        _assert_trees_close(getattr(resumed, name), getattr(straight, name), 1e-6, name)
    # The loss logged for the last steps is the same too (same data, same dropout keys).
    a, b = read_scalars(f"{tmp_path}/straight", "loss"), read_scalars(interrupted, "loss")
    assert a[n] == pytest.approx(b[n], rel=1e-6)
    assert set(read_scalars(interrupted, "val_miou")) == {n}  # validated once, at the end


@pytest.mark.heavy(seconds=100)
def test_synthetic_config_lowers_the_loss(tiny_data_dir, tmp_path):
    config = load_config_file(os.path.join(REPO, "configs/synthetic.py"))
    config.data.data_dir = tiny_data_dir
    config.train.update(
        num_steps=60, log_every=10, eval_every=0, checkpoint_every=1000, grad_flow_every=30
    )
    config.eval.max_batches = 1
    state = trainer.train_and_evaluate(config, str(tmp_path))
    loss = read_scalars(str(tmp_path), "loss")
    assert sorted(loss) == [10, 20, 30, 40, 50, 60]
    assert loss[60] < 0.8 * loss[10], loss
    assert np.isfinite(read_scalars(str(tmp_path), "val_miou")[60])
    for tag in ("learning_rate", "grad_norm", "bases_norm", "param_norm"):
        assert np.isfinite(read_scalars(str(tmp_path), tag)[60]), tag
    # Per-HEM-layer input gradients on the fixed batch (T = 3 layers), every 30 steps.
    n_step = [read_scalars(str(tmp_path), f"grad_flow/n_step_t{t}") for t in (1, 2, 3)]
    assert all(sorted(v) == [30, 60] and v[60] > 0 for v in n_step), n_step
    # Basis diagnostics at every log step; those of mu0 are the final state's bases'.
    logged = {tag: read_scalars(str(tmp_path), f"bases/{tag}") for tag in (
        "distinct_bases", "largest_cluster", "norm_mean", "norm_std", "effective_in_use",
        "effective_distinguishing", "distinct_attention")}
    assert all(sorted(v) == [10, 20, 30, 40, 50, 60] for v in logged.values()), logged
    mu0 = np.asarray(state.bases["hem"]["mu"])
    norms = np.linalg.norm(mu0, axis=-1)
    assert logged["norm_mean"][60] == pytest.approx(norms.mean(), rel=1e-5)
    assert logged["norm_std"][60] == pytest.approx(norms.std(), rel=1e-4)
    assert logged["distinct_bases"][60] == hem_diagnostics.distinct_bases(mu0).max() + 1
    k = config.model.num_bases
    for tag in ("effective_in_use", "effective_distinguishing", "distinct_attention"):
        assert 1.0 <= logged[tag][60] <= k, (tag, logged[tag])


def test_unknown_config_key_is_named(tmp_path):
    result = subprocess.run(
        _train_cmd(tmp_path, tmp_path, "--config.train.learning_rat=0.1"),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_subprocess_env(1),
        timeout=120,
    )
    assert result.returncode != 0
    assert "Unknown config key 'train.learning_rat'" in result.stderr
    assert "learning_rate" in result.stderr  # the suggestion


@pytest.mark.heavy(seconds=60)
def test_sigterm_saves_a_checkpoint_that_resumes(tiny_data_dir, tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(
            workdir,
            tiny_data_dir,
            "--config.train.num_steps=100000",
            "--config.train.log_every=1",
            "--config.train.checkpoint_every=100000",
            "--config.train.basis_diagnostics=True",  # logged, but not on the console
        ),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env=_subprocess_env(2),
    )
    console = []
    try:
        for line in proc.stderr:
            console.append(line)
            if re.search(r"\] \[2\] .*loss=", line) or re.search(r"^\[2\] .*loss=", line):
                proc.send_signal(signal.SIGTERM)
                break
        console.append(proc.stderr.read())
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    _assert_console_and_log_file(workdir, "".join(console))
    saved = Checkpointer(f"{workdir}/checkpoints", read_only=True).latest_step()
    assert saved is not None and 2 <= saved < 100
    # On the subprocess's 2 devices.
    resumed = trainer.train_and_evaluate(_config(tiny_data_dir, num_steps=saved + 2), str(workdir),
                                         mesh=sharding.create_mesh(jax.devices()[:2]))
    assert int(resumed.step) == saved + 2


def _assert_console_and_log_file(workdir, console: str) -> None:
    """Issue 15, Found 6-7: the console shows the run, not library noise; the workdir holds the
    resolved config as config.json and what the console showed as train.log."""
    for noise in ("libtpu", "[Hyperparameters]", "Config:\n", "read only", "dataset_info.py",
                  "reader.py", "\x1b[", "oneDNN", "absl::InitializeLog", "tf_record_dataset"):
        assert noise not in console, noise
    with open(workdir / "config.json") as f:
        saved = json.load(f)
    assert saved["model"]["num_bases"] == 8 and saved["train"]["num_steps"] == 100000
    assert saved["data"]["scales"] == [0.75, 1.0, 1.25]
    log = (workdir / "train.log").read_text()
    assert re.search(r"\[2\] .*loss=", log) and "Stopped at step" in log
    # Issue 21, item 7: one console line per log step (every step here) with the loss, the
    # learning rate, steps/s and ETA; every scalar, bases/* too, in train.log (and TensorBoard).
    steps = [int(s) for s in re.findall(r"^\S+ \S+ +\d+ \S+\] \[(\d+)\] ", console, re.M)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2, console
    for line in re.findall(r"^.*\] \[\d+\] .*$", console, re.M)[1:]:
        assert re.search(r"\] \[\d+\] loss=[\d.e+-]+, learning_rate=[\d.e+-]+, [\d.e+]+ steps/s, "
                         r"ETA \d+:\d\d:\d\d$", line), line
    assert "bases/" not in console and "grad_norm" not in console
    for step in range(1, len(steps) + 1):
        assert re.search(rf"\] \[{step}\] bases/distinct_attention=\d+, bases/distinct_bases=", log)
        assert re.search(rf"\] \[{step}\] bases_norm=.*grad_norm=", log)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.heavy(seconds=30)
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data_dir, tiny_run, tmp_path):
    """Resumes conftest's `tiny_run` (the tiny config stopped at step 2, one device)."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    config = _config(tiny_data_dir, num_steps=TINY_RUN_NUM_STEPS)
    assert config.train.checkpoint_every == 3
    ckpt = Checkpointer(f"{workdir}/checkpoints", read_only=True)
    assert ckpt.latest_step() == 2
    mesh = sharding.create_mesh(jax.devices()[:1])
    config.train.learning_rate = 1e30  # diverges at once
    with pytest.raises(FloatingPointError, match=r"NaN or Inf at step 3\..*checkpoint is step 2"):
        trainer.train_and_evaluate(config, str(workdir), mesh=mesh)
    ckpt = Checkpointer(f"{workdir}/checkpoints", read_only=True)
    assert ckpt.latest_step() == 2
    assert sorted(os.listdir(f"{workdir}/checkpoints")) == ["2"]  # nothing written after it
    model = create_model(config.model, num_classes=6)
    tx, _ = optimizer_for(config, model)
    restored, _ = ckpt.restore(abstract_state(model, tx, mesh), config)
    assert int(restored.step) == 2
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored.params))
