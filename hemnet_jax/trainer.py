"""The training loop: one jitted step over a mesh of every device, orbax checkpoints, clu logging.

`train.py` parses flags and calls `train_and_evaluate`; nothing else imports this module. The loop
drives the components of `hemnet_jax.training` (state, step, input pipeline, checkpoints,
preemption) and `evaluation.validation`; it knows the model and the HEM unit only through
`models.create_model` and the variable collections they declare.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from hemnet_jax import _compat, storage
from hemnet_jax.data import datasets
from hemnet_jax.errors import UserError
from hemnet_jax.evaluation import metrics, validation
from hemnet_jax.models import create_model
from hemnet_jax.studies import layer_gradients
from hemnet_jax.training import checkpointing, diagnostics, sharding
from hemnet_jax.training.input_pipeline import prepare_data, train_batches
from hemnet_jax.training.preemption import PreemptionWatcher
from hemnet_jax.training.progress import ProgressLine
from hemnet_jax.training.state import TrainState, abstract_state, init_state, optimizer_for
from hemnet_jax.training.train_step import make_train_step
from hemnet_jax.training.workdir_lock import run_lock

# Until 0.2 this module also held the state, data and validation functions (see _compat).
__getattr__ = _compat.moved_attributes(
    __name__,
    {
        "validate": "hemnet_jax.evaluation.validation",
        "eval_batches": "hemnet_jax.evaluation.validation",
        "MUTABLE": "hemnet_jax.training.train_step",
    },
)

# ---------------------------------------------------------------------------------------------
# The loop.


class TrainingDivergedError(FloatingPointError, UserError):
    """The loss or the parameters became NaN or Inf; the message names the step and the last good
    checkpoint."""


def _check_finite(summary: list[dict[str, np.ndarray]], first_step: int, ckpt_step) -> None:
    """Raises FloatingPointError naming the first step (of the window after `first_step`, its
    metrics on the host) whose loss or parameters are not finite.

    Checked on the host, where the window is fetched anyway, rather than by device ops
    dispatched every step (on several processes, programs of their own each step). On two CPU
    processes this left the step rate as it was (0.5-0.6 s per step either way, measured)."""
    bad = next((first_step + 1 + i for i, m in enumerate(summary)
                if not (np.isfinite(m["loss"]) and np.isfinite(m["param_norm"]))), None)
    if bad is None:
        return
    kept = (f"the last good checkpoint is step {ckpt_step}" if ckpt_step is not None
            else "no checkpoint had been saved yet")
    raise TrainingDivergedError(
        f"The training loss or parameters became NaN or Inf at step {bad}. Training stopped "
        f"without saving; {kept}. Lower train.learning_rate, check the data, or train in "
        "float32 (model.dtype)."
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mesh: Mesh | None = None,
    stop_after: int | None = None,
    lock: bool = True,
) -> TrainState:
    """Trains `config` in `workdir`, resuming from its latest checkpoint.

    Args:
      mesh: devices to use (default: every device of every process).
      stop_after: stop after this many steps of this invocation, saving a checkpoint as a
        preemption would (a later call resumes).
      lock: hold the workdir's lock (`workdir_lock.run_lock`) for the run; False when the
        caller holds it (train.py takes it before writing anything to the workdir).
    Returns:
      The final training state.
    Raises:
      WorkdirLockedError: another live run trains in `workdir` (checked before any work).
      checkpointing.NoVerifiedCheckpointError: checkpoints exist but none verifies.
      checkpointing.CheckpointSaveError: a save failed (reported at the next step; with several
        processes, on every process at the next log or save step).
      FloatingPointError: the loss or the parameters became NaN or Inf.
    """
    if not lock:
        return _train_and_evaluate(config, workdir, mesh, stop_after)
    with run_lock(checkpointing.resolve_path(workdir)):
        return _train_and_evaluate(config, workdir, mesh, stop_after)


def _train_and_evaluate(config, workdir, mesh, stop_after) -> TrainState:
    mesh = sharding.create_mesh() if mesh is None else mesh
    info = datasets.get_dataset_info(config.data.name)
    prepare_data(config)  # loads TensorFlow
    # clu imports TensorFlow at import: here, after prepare_data, not when train.py starts.
    from clu import metric_writers, periodic_actions

    num_steps = config.train.num_steps
    model = create_model(config.model, info.num_classes)

    # TensorBoard's events go through TensorFlow's file system: on gs:// they are staged locally
    # and copied into the bucket at every checkpoint and at the end (storage.Staging).
    staging = storage.staging(workdir) if storage.is_remote(workdir) else None
    logdir = staging.local if staging else workdir
    writer = metric_writers.create_default_writer(
        logdir, just_logging=jax.process_index() > 0, asynchronous=True
    )
    ckpt = checkpointing.Checkpointer(
        f"{workdir}/checkpoints",
        every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints,
    )
    meta = checkpointing.run_metadata(config)

    tx, schedule = optimizer_for(config, model)
    if ckpt.latest_step() is None:
        state, latest = init_state(config, model, tx, mesh), None
        logging.info("Initialised a new run in %s.", workdir)
        writer.write_hparams(_flat_hparams(config))
    else:
        rule = config.train.state_sharding
        state, _ = ckpt.restore(
            abstract_state(model, tx, mesh, rule), config, fallback=True, quarantine=True
        )
        latest = int(state.step)
        logging.info("Resumed from the checkpoint of step %d in %s.", latest, workdir)
    start_step = int(state.step)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info(
        "%s: %.2fM parameters; %d devices in %d processes; global batch %d.",
        config.model.backbone,
        num_params / 1e6,
        mesh.devices.size,
        jax.process_count(),
        config.train.batch_size,
    )

    train_step = make_train_step(model, tx, schedule, config, mesh)
    key = jax.device_put(jax.random.PRNGKey(config.seed + 1), sharding.replicated(mesh))
    batches = train_batches(config, mesh, start_step)
    hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)]
    if config.train.profile and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(logdir=logdir, num_profile_steps=5))

    loop = _Loop(config, mesh, model, info, writer, ckpt, meta, latest)
    loop.staging = staging
    if config.train.grad_flow_every:
        loop.grad_flow = _grad_flow_probe(config, model, mesh)
    if config.train.basis_diagnostics:
        loop.diagnostics = diagnostics.make_probe(model, mesh, train=True)
    # Installed for the rest of the process: a notice during the final validation finds the
    # final checkpoint already written and lets the validation finish.
    preemption = PreemptionWatcher(agree_every=config.train.log_every).install(start_step)
    try:
        state = loop.run(state, train_step, batches, key, hooks, stop_after, preemption)
    finally:
        ckpt.close()  # lets a save in flight finish, whatever happened
        writer.flush()
        if staging:
            staging.sync()
    return state


def _grad_flow_probe(config, model, mesh: Mesh) -> tuple[Callable, dict[str, jax.Array]]:
    """Per-HEM-layer input-gradient magnitudes (Fig. 3(d) over training) on a fixed batch: the
    first batch of the training stream, the same whenever the run is resumed."""
    probe = jax.jit(
        functools.partial(layer_gradients.layer_gradient_metrics, model),
        out_shardings=sharding.replicated(mesh),
    )
    return probe, sharding.global_batch(next(train_batches(config, mesh, 0)), mesh)


class _Loop:
    """The step loop's bookkeeping: logging windows, finiteness, checkpoints, validation."""

    def __init__(self, config, mesh, model, info, writer, ckpt, meta, last_saved):
        self.config, self.mesh, self.model, self.info = config, mesh, model, info
        self.writer, self.ckpt, self.meta = writer, ckpt, meta
        self.last_saved = last_saved
        self.grad_flow: tuple[Callable, dict] | None = None  # (jitted probe, fixed batch)
        self.diagnostics: diagnostics.Probe | None = None  # the bases/* scalars at log steps
        self.progress = ProgressLine(config.train.num_steps)  # the console's line per log step
        self.staging: storage.Staging | None = None  # a gs:// run's events and log

    def run(self, state, train_step, batches, key, hooks, stop_after, preemption) -> TrainState:
        t = self.config.train
        step = first = int(state.step)
        last_stop = t.num_steps if stop_after is None else min(t.num_steps, step + stop_after)
        window: list[dict[str, jax.Array]] = []
        window_start = step
        while step < last_stop:
            batch = sharding.global_batch(next(batches), self.mesh)
            state, step_metrics = train_step(state, batch, key)
            step += 1
            if step == first + 1:  # compiled and run: the console's steps/s count from here
                jax.block_until_ready(step_metrics)
                self.progress.start(step)
            # A background save that failed stops the run here: one step after it ended, or, with
            # several processes, at a log step (or the next save), where they agree on it.
            if jax.process_count() == 1 or step % t.log_every == 0:
                self.ckpt.check_saved()
            window.append(step_metrics)  # fetched (a host sync) only where it logs or saves
            for hook in hooks:
                hook(step)
            preempted = preemption.reached(step)
            final = step == last_stop or preempted
            save = final or step % max(t.checkpoint_every, 1) == 0
            if save or step % t.log_every == 0:
                summary = jax.device_get(window)
                _check_finite(summary, window_start, self.last_saved)
                self._write_window(step, summary)
                window, window_start = [], step
                if self.diagnostics:
                    self._write_diagnostics(step, state, batch)
            if save:
                self.ckpt.save(step, state, self.meta, force=final)
                self.last_saved = step
                if self.staging:
                    self.writer.flush()
                    self.staging.sync()
            if t.eval_every and step % t.eval_every == 0 and step < t.num_steps:
                self._validate(step, state)
            if self.grad_flow and step % t.grad_flow_every == 0:
                probe, fixed_batch = self.grad_flow
                values = jax.device_get(probe(state.variables, fixed_batch))
                self.writer.write_scalars(step, {k: float(v) for k, v in values.items()})
            if preempted:
                self.ckpt.wait()
                logging.warning("Stopped at step %d after a preemption notice; its checkpoint "
                                "is saved.", step)
                return state
        self.ckpt.wait()  # the final checkpoint is on disk before the final validation starts
        if step == t.num_steps and t.validate_at_end:
            self._validate(step, state)
        return state

    def _write_window(self, step: int, summary: list[dict[str, np.ndarray]]) -> None:
        """Writes the means of the metrics of the steps since the last write (on the host)."""
        if summary:
            means = {k: float(np.mean([m[k] for m in summary])) for k in summary[0]}
            self.writer.write_scalars(step, means)  # TensorBoard and the log file
            self.progress.log(step, means)  # and the console's one line

    def _write_diagnostics(self, step: int, state: TrainState, batch: dict) -> None:
        """The bases/* scalars: mu0 after the step, attention on the step's batch."""
        sums = diagnostics.add_stats(None, self.diagnostics(state.variables, batch["image"]))
        self.writer.write_scalars(step, diagnostics.scalars(sums))

    def _validate(self, step: int, state: TrainState) -> None:
        info = self.info
        result = validation.validate(
            self.config, self.model, state.variables, self.mesh, info.num_classes
        )
        self.writer.write_scalars(
            step, {"val_miou": result["miou"], "val_pixel_accuracy": result["pixel_accuracy"]}
        )
        logging.info(
            "Validation at step %d:\n%s", step, metrics.format_table(result, info.class_names)
        )


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = {}

    def visit(prefix: str, node) -> None:
        for k, v in node.items():
            if isinstance(v, ml_collections.ConfigDict):
                visit(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)

    visit("", config)
    return flat
