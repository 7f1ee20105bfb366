"""Two real train.py processes on localhost (2 CPU devices each, gloo): they agree with one
process, and a preemption is agreed by every process. SIGTERM to one of them (and, in a second
run, to each at a different step): both exit 0 within a bound, both save the same step, and the
resumed run ends bitwise equal to a straight one. Also the single-process case of a SIGTERM
during the final validation.

One straight two-process run serves both the agreement with one process and the resumption
check, so both are in one test.
"""

import re
import signal
import subprocess
import threading
import time

import jax
import numpy as np
import pytest

from hemnet_jax.data import pipeline
from hemnet_jax.models import create_model
from hemnet_jax.training import sharding
from hemnet_jax.training.checkpointing import Checkpointer
from hemnet_jax.training.state import abstract_state, init_state, optimizer_for
from hemnet_jax.training.train_step import make_train_step
from tests.test_train import REPO, _config, _free_port, _subprocess_env, _train_cmd, read_scalars
from tests.tiny import tiny_config

NUM_STEPS = 24
EXIT_BOUND_S = 180  # from the first SIGTERM to both exits; includes compiling the digest


class _Run:
    """One train.py process whose stderr is read in a thread: the last step it logged."""

    def __init__(self, cmd, env):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, cwd=REPO, env=env)
        self.lines: list[str] = []
        self.step = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"\] \[(\d+)\] .*loss=", line) or re.search(r"^\[(\d+)\] .*loss=", line)
            if m:
                self.step = int(m.group(1))

    def wait_for_step(self, step: int, timeout: float = 300, *, required: bool = True) -> None:
        """Until the process logged `step` (or, unless `required`, has exited)."""
        end = time.time() + timeout
        while self.step < step and self.proc.poll() is None and time.time() < end:
            time.sleep(0.05)
        assert self.step >= step or not required, "".join(self.lines[-40:])

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
        self._reader.join(timeout=10)
        return rc


def _two_processes(workdir, data_dir, *extra):
    """Process i of two (2 CPU devices each), NUM_STEPS steps without dropout, a log line per
    step, checkpoints only at the end unless `extra` says otherwise."""
    port = _free_port()
    return [
        _Run(_train_cmd(workdir, data_dir, f"--config.train.num_steps={NUM_STEPS}",
                        "--config.train.log_every=1", "--config.train.checkpoint_every=1000",
                        "--config.model.dropout=0.0",
                        *extra, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                        f"--process_id={i}"),
             _subprocess_env(2))
        for i in range(2)
    ]


def _restore(workdir, step=None, config=None, num_devices=1):
    if config is None:
        config = tiny_config()
        config.model.dropout = 0.0  # as the runs were trained (checked against their metadata)
    model = create_model(config.model, num_classes=6)
    tx, _ = optimizer_for(config, model)
    mesh = sharding.create_mesh(jax.devices()[:num_devices])
    ckpt = Checkpointer(f"{workdir}/checkpoints", read_only=True)
    state, _ = ckpt.restore(abstract_state(model, tx, mesh), config, step)
    return jax.device_get(state)


def _bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) and leaves_a
    pairs = zip(leaves_a, leaves_b, strict=True)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


def _assert_agrees_with_one_process(straight_run, tiny_data_dir):
    """The two processes equal one process on 4 devices fed the same global batches: the logged
    loss of the first two steps and the state after them.

    Two steps, without dropout: from the third step on, this tiny network's gradient is so
    ill-conditioned that float32 rounding alone (gloo's all-reduce against XLA's sums) moves it
    by ~2% while the loss agrees to 2e-5 (measured); see also test_train_step.py.
    """
    # The single-process reference: the two processes' shards, concatenated per step.
    config = _config(tiny_data_dir, num_steps=NUM_STEPS)  # the same learning-rate schedule
    config.model.dropout = 0.0
    mesh = sharding.create_mesh(jax.devices()[:4])
    model = create_model(config.model, num_classes=6)
    tx, schedule = optimizer_for(config, model)
    state = init_state(config, model, tx, mesh)
    initial = jax.device_get(state)
    step = make_train_step(model, tx, schedule, config, mesh)
    key = jax.device_put(jax.random.PRNGKey(config.seed + 1), sharding.replicated(mesh))
    streams = [
        pipeline.make_train_dataset(
            name=config.data.name,
            split="train",
            data_dir=tiny_data_dir,
            manual_dir=None,
            per_process_batch_size=4,
            crop_size=config.data.crop_size,
            scales=tuple(config.data.scales),
            seed=config.seed,
            process_index=i,
            process_count=2,
            shuffle_buffer=config.data.shuffle_buffer,
        ).as_numpy_iterator()
        for i in range(2)
    ]
    logged = read_scalars(str(straight_run), "loss")  # process 0 writes the TensorBoard log
    for t in (1, 2):
        parts = [next(s) for s in streams]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")}
        state, metrics = step(state, sharding.global_batch(batch, mesh), key)
        assert logged[t] == pytest.approx(float(metrics["loss"]), rel=1e-5), t

    restored = _restore(straight_run, 2, config, num_devices=4)
    assert int(restored.step) == 2
    # What training changed must agree. Measured: 2.4e-3 (params), 6e-6 (statistics), 5e-7
    # (bases) of the change; batches from another data seed left 1.3, 0.12, 0.04 (3 steps, dropout).
    # With the official training resize (issue 13) the crops differ and params measured 3.8e-2
    # (the same code with the previous resize: under 2e-2), while the loss of both steps agrees
    # to 1e-5: rounding amplified by this network on other crops, far below a sharding error.
    state = jax.device_get(state)
    for name, tolerance in (("params", 6e-2), ("batch_stats", 1e-3), ("bases", 1e-3)):
        change_mp = _flat(getattr(restored, name)) - _flat(getattr(initial, name))
        change_ref = _flat(getattr(state, name)) - _flat(getattr(initial, name))
        relative = np.linalg.norm(change_mp - change_ref) / np.linalg.norm(change_ref)
        assert relative < tolerance, (name, relative)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.heavy(seconds=300)
def test_two_processes_agree_with_one_and_stop_together(tiny_data_dir, tmp_path):
    # 0. A straight run (a checkpoint kept every 2 steps) agrees with one process.
    straight_run = tmp_path / "straight"
    runs = _two_processes(straight_run, tiny_data_dir, "--config.train.checkpoint_every=2",
                          f"--config.train.keep_checkpoints={NUM_STEPS}")
    assert [r.finish(400) for r in runs] == [0, 0], "".join(runs[0].lines[-30:])
    _assert_agrees_with_one_process(straight_run, tiny_data_dir)

    # 1. SIGTERM to process 1 only.
    runs = _two_processes(tmp_path / "one", tiny_data_dir)
    runs[1].wait_for_step(3)
    t0 = time.time()
    runs[1].proc.send_signal(signal.SIGTERM)
    codes = [r.finish(EXIT_BOUND_S) for r in runs]
    elapsed_one = time.time() - t0
    assert codes == [0, 0], "".join(runs[0].lines[-30:] + runs[1].lines[-30:])
    ckpt = Checkpointer(f"{tmp_path}/one/checkpoints", read_only=True)
    stop = ckpt.latest_step()
    assert ckpt.all_steps() == [stop] and 3 < stop < NUM_STEPS, ckpt.all_steps()
    for r in runs:  # every process stopped at that step, after a notice it did not all receive
        assert any(f"Stopped at step {stop} after a preemption notice" in x for x in r.lines)

    # 2. SIGTERM to each process, at different steps.
    runs = _two_processes(tmp_path / "each", tiny_data_dir)
    runs[0].wait_for_step(2)
    t0 = time.time()
    runs[0].proc.send_signal(signal.SIGTERM)
    # The agreed stop may come before process 1 logs two more steps: then it has already exited
    # and its own notice is moot (send_signal does nothing to a finished process).
    runs[1].wait_for_step(runs[1].step + 2, required=False)
    runs[1].proc.send_signal(signal.SIGTERM)
    codes = [r.finish(EXIT_BOUND_S) for r in runs]
    elapsed_each = time.time() - t0
    assert codes == [0, 0], "".join(runs[0].lines[-30:] + runs[1].lines[-30:])
    steps = Checkpointer(f"{tmp_path}/each/checkpoints", read_only=True).all_steps()
    assert len(steps) == 1 and 2 < steps[0] < NUM_STEPS, steps
    print(f"exit after the first SIGTERM: {elapsed_one:.1f} s (one), {elapsed_each:.1f} s (each)")

    # 3. The first run resumed (two processes again) equals a straight run, bitwise.
    runs = _two_processes(tmp_path / "one", tiny_data_dir)
    assert [r.finish(400) for r in runs] == [0, 0], "".join(runs[0].lines[-30:])
    resumed, straight = _restore(tmp_path / "one"), _restore(straight_run)
    assert int(resumed.step) == int(straight.step) == NUM_STEPS
    assert _bitwise_equal(resumed, straight)


@pytest.mark.heavy(seconds=25)
def test_sigterm_during_final_validation_keeps_the_final_checkpoint(tiny_data_dir, tmp_path):
    run = _Run(_train_cmd(tmp_path, tiny_data_dir, "--config.train.num_steps=4",
                          "--config.train.checkpoint_every=1000", "--config.eval.max_batches=2",
                          "--config.train.validate_at_end=True"),
               _subprocess_env(1))
    end = time.time() + 300
    while not any("Saving checkpoint of step 4" in x for x in run.lines):
        assert run.proc.poll() is None and time.time() < end, "".join(run.lines[-30:])
        time.sleep(0.02)
    run.proc.send_signal(signal.SIGTERM)  # while the final save is written, or validation runs
    assert run.finish(120) == 0, "".join(run.lines[-30:])
    assert any("val_miou" in x for x in run.lines)
    assert Checkpointer(f"{tmp_path}/checkpoints", read_only=True).all_steps() == [4]
