"""Orbax checkpoints of the training state, with the run's model config beside it.

Each step directory holds `state` (params, optimiser state, BatchNorm statistics, HEM bases, step)
and `meta` (JSON: the model config, dataset, seed, and a content digest of every array of the state,
`training.digest`). Orbax writes into a temporary directory and renames it when complete, so an
interrupted save never replaces a good checkpoint. A restore checks the digest; a step that fails
(missing, truncated or corrupt files, a digest mismatch, an empty or partial directory) is skipped
with one warning line for the newest step that verifies (see docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from hemnet_jax import storage
from hemnet_jax.config_check import has_checkpoint  # noqa: F401  (part of this module's API)
from hemnet_jax.errors import UserError
from hemnet_jax.training import digest
from hemnet_jax.training.save_barrier import SaveBarrier

# Model keys that do not change what a checkpoint holds or means: a run may differ in them.
RUNTIME_ONLY_MODEL_KEYS = frozenset({"pretrained", "dtype", "remat", "aux_loss_weight"})
# Model keys added after checkpoints were first written: a checkpoint without one was trained
# with this value (the behaviour before the key existed).
ADDED_MODEL_KEYS = {"freeze_unit_conv_in": False}
# Model keys that change only what the optimiser updates, not what the trained model computes:
# evaluation ignores them (and restores no optimiser state).
TRAINING_ONLY_MODEL_KEYS = frozenset({"freeze_unit_conv_in"})


def resolve_path(path: str) -> str:
    """Local paths absolute, with ~ expanded; gs:// and other URLs as given."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


# Orbax writes a replicated array "replica-parallel": each replica writes a slice of it, cut on
# the device by one small XLA program per array shape, all compiled at a process's first save.
# For this state (hundreds of arrays, replicated, small next to what one host writes per second)
# that costs more than it saves. Measured for the tiny test model on 8 CPU devices: first save
# 12.8 s (217 compiles), later ones 1.0 s. Below this slice size an array is written whole by its
# first replica, as orbax does by default on GPU.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 16 << 20


def _configure_array_writes() -> None:
    """Orbax's handler of jax.Array with the threshold above (process-wide, idempotent)."""
    current = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(current, "_min_slice_bytes_for_replica_parallel", None) == (
            MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL):
        return
    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL,
        # keep the per-array metadata that orbax's default handler records
        array_metadata_store=getattr(current, "_array_metadata_store", None),
    )
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


# Orbax runs each restore in a fresh asyncio event loop and closes that loop as soon as the
# restore returns or raises. When one read of a damaged step fails, its exception ends the
# restore while TensorStore's other reads of the step are still in flight; each of them then
# completes into the closed loop (`call_soon_threadsafe`: "RuntimeError: Event loop is closed",
# one traceback per read, from TensorStore's threads). A loop created during our restores first
# lets its pending tasks finish (or cancels them after DRAIN_TIMEOUT_S), then closes.
DRAIN_TIMEOUT_S = 120.0


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """An event loop whose `close` waits for its pending tasks (their errors are discarded)."""

    def close(self) -> None:
        pending = [] if self.is_running() or self.is_closed() else [
            t for t in asyncio.all_tasks(self) if not t.done()]
        if pending:
            with contextlib.suppress(Exception):
                self.run_until_complete(asyncio.wait_for(
                    asyncio.gather(*pending, return_exceptions=True), DRAIN_TIMEOUT_S))
        super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    _loop_factory = _DrainingEventLoop


@contextlib.contextmanager
def _reads_finish_before_loops_close() -> Iterator[None]:
    """New asyncio event loops (orbax's, during the block) wait for their tasks before closing."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


class CheckpointMismatchError(ValueError, UserError):
    """A checkpoint was written by a run with another model or dataset."""


class NoVerifiedCheckpointError(RuntimeError, UserError):
    """No checkpoint step that was tried restores and matches its digest; the message (one line)
    lists each step tried and why it failed."""


# The outcome of a pending save on one process (agreed between processes by `check_saved`).
_SAVING, _SAVED, _SAVE_FAILED = 0, 1, 2
SAVE_POLL_S = 0.1  # with several processes, a blocking check agrees this often while saves run


class CheckpointSaveError(RuntimeError, UserError):
    """A checkpoint save (in the background) failed; the message (one line) gives the cause, the
    path and what to do."""


class _Unverified(Exception):
    """One step failed to restore or verify; the message is the reason, short."""


def run_metadata(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (JSON-serialisable)."""
    model = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.to_dict().items()}
    return {"model": model, "dataset": config.data.name, "seed": config.seed}


def check_compatible(saved: dict[str, Any], config: ml_collections.ConfigDict, where: str, *,
                     evaluation: bool = False) -> None:
    """Raises CheckpointMismatchError naming every model key (and the dataset) that differs
    (for `evaluation`, apart from TRAINING_ONLY_MODEL_KEYS)."""
    current = run_metadata(config)
    diffs, unrecorded = [], []
    for key in sorted(set(saved.get("model", {})) | set(current["model"])):
        if key in RUNTIME_ONLY_MODEL_KEYS or (evaluation and key in TRAINING_ONLY_MODEL_KEYS):
            continue
        old, new = (
            saved.get("model", {}).get(key, ADDED_MODEL_KEYS.get(key, "<absent>")),
            current["model"].get(key, "<absent>"),
        )
        if old != new:
            diffs.append(f"  model.{key}: checkpoint {old!r}, config {new!r}")
            if key in ADDED_MODEL_KEYS and key not in saved.get("model", {}):
                unrecorded.append((f"model.{key}", old))
    if saved.get("dataset") != current["dataset"]:
        diffs.append(
            f"  data.name: checkpoint {saved.get('dataset')!r}, config {current['dataset']!r}"
        )
    if diffs and len(unrecorded) == len(diffs):  # only keys the checkpoint predates
        keys = " and ".join(k for k, _ in unrecorded)
        flags = " ".join(f"--config.{k}={v}" for k, v in unrecorded)
        raise CheckpointMismatchError(
            f"The checkpoint {where} was written before {keys} existed, so it was trained with "
            f"{', '.join(f'{k}={v}' for k, v in unrecorded)}: add {flags} to continue it as it "
            "was trained, or start afresh in another --workdir (evaluating it needs no flag)."
        )
    if diffs:
        hint = ""
        if any("num_iters" in d for d in diffs):
            hint = " (to evaluate with another number of HEM iterations, set eval.num_iters)"
        raise CheckpointMismatchError(
            f"The checkpoint {where} was written by another model configuration:\n"
            + "\n".join(diffs)
            + f"\nUse the config it was trained with{hint}, or another --workdir/--checkpoint."
        )


def check_recorded_config(
    config: ml_collections.ConfigDict, directory: str, step: int | None = None, *,
    evaluation: bool = False,
) -> int | None:
    """Checks the run recorded with a checkpoint of `directory` (`step`, default the newest whose
    metadata reads) against `config` (for `evaluation`: see `check_compatible`), reading only its
    JSON, before any model or dataset is built.

    Returns:
      The step checked; None when `directory` holds no checkpoint whose metadata reads.
    Raises:
      CheckpointMismatchError: another model or dataset; every differing key is named.
      NoVerifiedCheckpointError: the metadata of an explicit `step` cannot be read.
    """
    if not has_checkpoint(directory):
        return None
    ckpt = Checkpointer(directory, read_only=True)
    try:
        candidates = [step] if step is not None else sorted(ckpt.all_steps(), reverse=True)
        for candidate in candidates:
            try:
                ckpt.check_config(config, candidate, evaluation=evaluation)
                return candidate
            except _Unverified as e:
                if step is not None:
                    raise NoVerifiedCheckpointError(
                        f"The checkpoint {os.path.join(ckpt.directory, str(step))} does not "
                        f"verify: {e}."
                    ) from None
        return None
    finally:
        ckpt.close()


class Checkpointer:
    """A `CheckpointManager` over `<workdir>/checkpoints`: save every N steps, keep the last K,
    asynchronously; restore only what verifies."""

    def __init__(
        self,
        directory: str,
        *,
        every: int = 1,
        keep: int | None = 3,
        asynchronous: bool = True,
        read_only: bool = False,
    ):
        self.directory = resolve_path(directory)  # orbax needs absolute local paths
        self._read_only = read_only
        self._pending: int | None = None  # the step of a save whose outcome is not agreed yet
        self._error: str | None = None  # why the pending save failed on this process
        self._failed = False  # a save failed: its writes may still be pending in orbax's loop
        # Several processes: orbax's save threads meet at barriers that a failed save ends.
        self._barrier = (SaveBarrier() if jax.process_count() > 1 and asynchronous
                         and not read_only else None)
        _configure_array_writes()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(  # read-only: no saving, no pruning
                save_interval_steps=0 if read_only else max(every, 1),
                max_to_keep=None if read_only else keep,
                enable_async_checkpointing=asynchronous,
                create=not read_only,
                read_only=read_only,
                async_options=(ocp.AsyncOptions(barrier_sync_fn=self._barrier)
                               if self._barrier else None),
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving (in the background) if `step` is on the cadence or `force`, with the
        digest of every array of `state` recorded in `meta`."""
        self.check_saved(block=True)  # orbax waits for the previous save anyway
        if not (force or self._manager.should_save(step)):
            return False
        meta = {**meta, "digest": digest.state_digest(state)}
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )
        if saved:
            self._pending = step
            logging.info("Saving checkpoint of step %d to %s.", step, self.directory)
        return saved

    def check_saved(self, *, block: bool = False) -> None:
        """Raises CheckpointSaveError if the last background save has failed; cheap when it is
        still running (unless `block`) or was already checked.

        With several processes every process calls this at the same steps: while a save is
        pending, they agree on its outcome (an all-gather of one integer; while `block`, one
        every SAVE_POLL_S), and all raise together, naming the same step to resume from, when
        it failed on any of them.
        """
        while self._pending is not None:  # the same on every process
            outcomes = _on_every_process(self._outcome_here(wait=block and not self._barrier))
            if _SAVE_FAILED in outcomes:
                self._stop([i for i, o in enumerate(outcomes) if o == _SAVE_FAILED])
            if all(o == _SAVED for o in outcomes):
                self._pending = None
            elif not block:
                return
            else:
                time.sleep(SAVE_POLL_S)

    def _outcome_here(self, wait: bool) -> int:
        """The pending save on this process: _SAVED, _SAVE_FAILED or (unless `wait`) _SAVING."""
        if self._barrier and self._barrier.failure and self._error is None:
            self._error = _one_line(self._barrier.failure)  # seen before orbax's threads end
        if self._error is not None:
            return _SAVE_FAILED
        if not wait and self._manager.is_saving_in_progress():
            return _SAVING
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001  (any failure of the save is reported the same)
            self._error = _one_line(e)
            return _SAVE_FAILED
        return _SAVED

    def _stop(self, failed_on: list[int]) -> None:
        """Raises CheckpointSaveError for the pending save, which failed on `failed_on`."""
        step, self._pending, self._failed = self._pending, None, True
        if self._barrier:  # the other processes' save threads wait for this one's: end them
            self._barrier.abort()
            with contextlib.suppress(Exception):
                self._manager.wait_until_finished()
        where = f" on process {', '.join(map(str, failed_on))}" if jax.process_count() > 1 else ""
        cause = f": {self._error}" if self._error else ""
        last_good = [s for s in self._manager.all_steps() if s != step]
        raise CheckpointSaveError(
            f"Saving the checkpoint of step {step} to {self.directory} failed{where}{cause}. "
            "Free space or fix access there, then re-run the same command: it resumes from "
            + (f"step {max(last_good)}" if last_good else "the start (no checkpoint yet)")
            + "."
        )

    def restore(
        self,
        abstract_state: Any,
        config: ml_collections.ConfigDict,
        step: int | None = None,
        *,
        fallback: bool = False,
        quarantine: bool = False,
        evaluation: bool = False,
    ) -> tuple[Any, dict[str, Any]]:
        """Restores and verifies `step` (default: the latest) into the shapes and shardings of
        `abstract_state`, after checking the run's metadata against `config`.

        Args:
          fallback: when `step` is None, a latest step that fails is skipped (one warning line)
            for the newest older step that verifies.
          quarantine: move failed steps to `<workdir>/rejected_checkpoints/` (training does, so
            that new saves do not meet them).
          evaluation: the model only: `abstract_state` (a TrainState) comes back with
            opt_state None, whatever optimiser state the checkpoint holds; the training-only
            model keys are not compared (`check_compatible`).
        Raises:
          CheckpointMismatchError: the checkpoint was written by another model configuration.
          NoVerifiedCheckpointError: nothing tried verified; the message lists what was tried.
        """
        if step is not None:
            candidates = [step]
        else:
            candidates = sorted(self._manager.all_steps(), reverse=True)
            if not fallback:
                candidates = candidates[:1]
        if not candidates:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        failures = []
        for candidate in candidates:
            try:
                restored = self._restore_verified(abstract_state, config, candidate, evaluation)
            except _Unverified as e:
                failures.append((candidate, str(e)))
                more = fallback and step is None and candidate != candidates[-1]
                logging.warning(
                    "Checkpoint step %d in %s does not verify (%s)%s.", candidate,
                    self.directory, e, "; trying the next older step" if more else "",
                )
                continue
            if quarantine and failures:
                self._quarantine([s for s, _ in failures])
            return restored
        tried = "; ".join(f"step {s}: {reason}" for s, reason in failures)
        raise NoVerifiedCheckpointError(
            f"No checkpoint in {self.directory} verifies ({tried}). Restore a copy of the "
            "checkpoints, or start afresh in another --workdir (see docs/operations.md)."
        )

    def check_config(self, config: ml_collections.ConfigDict, step: int, *,
                     evaluation: bool = False) -> dict[str, Any]:
        """The run metadata recorded with `step` (JSON only, no state read), after checking it
        against `config` (CheckpointMismatchError names every key that differs); _Unverified
        when it cannot be read (on any process: every process calls this together)."""
        meta, error = None, ""
        try:
            with _reads_finish_before_loops_close():
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )["meta"]
        except Exception as e:  # noqa: BLE001  (any damage reads as "does not verify")
            error = f"its metadata cannot be read: {_one_line(e)}"
        if not error and not isinstance(meta, dict):
            error = "its metadata is not a JSON object"
        _raise_if_any_process_failed(error)
        check_compatible(meta, config, os.path.join(self.directory, str(step)),
                         evaluation=evaluation)
        return meta

    def _restore_verified(self, abstract_state, config, step: int,
                          evaluation: bool = False) -> tuple[Any, dict[str, Any]]:
        meta = self.check_config(config, step, evaluation=evaluation)
        if evaluation:  # every field of the TrainState but the optimiser's
            item = {k: v for k, v in vars(abstract_state).items() if k != "opt_state"}
            args = ocp.args.PyTreeRestore(
                item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True)
        else:
            args = ocp.args.StandardRestore(abstract_state)
        state, error = None, ""
        try:
            with _reads_finish_before_loops_close():
                state = self._manager.restore(step, args=ocp.args.Composite(state=args))["state"]
        except Exception as e:  # noqa: BLE001
            error = f"its state cannot be read: {_one_line(e)}"
        _raise_if_any_process_failed(error)  # before the digest, which every process computes
        recorded = meta.get("digest")
        if evaluation:
            state = abstract_state.replace(**state, opt_state=None)
            if recorded is not None:
                recorded = {k: v for k, v in recorded.items() if not k.startswith("opt_state/")}
        if recorded is None:
            logging.warning("Checkpoint step %d has no digest (written before digests were "
                            "recorded): restored without verification.", step)
        else:
            mismatch = digest.first_mismatch(recorded, digest.state_digest(state))
            if mismatch:
                raise _Unverified(mismatch)
        return state, meta

    def _quarantine(self, steps: list[int]) -> None:
        """Moves failed step directories aside (process 0), so the run can save those steps."""
        rejected = os.path.join(os.path.dirname(self.directory), "rejected_checkpoints")
        if jax.process_index() == 0:
            for step in steps:
                source, target = epath.Path(self.directory) / str(step), epath.Path(rejected)
                target.mkdir(parents=True, exist_ok=True)
                destination = target / str(step)
                if destination.exists():  # rejected before, by an earlier run
                    destination.rmtree()
                storage.move_tree(str(source), str(destination))  # local or gs://
                logging.warning("Moved the checkpoint of step %d to %s.", step, destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("hemnet_jax: rejected checkpoints moved")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until the save in flight is written; raises CheckpointSaveError if it failed."""
        self.check_saved(block=True)

    def close(self) -> None:
        if self._failed:
            # Closing would shut orbax's event loop under the failed save's writes still in
            # flight, each of which then prints a traceback; the process is ending anyway.
            return
        self._manager.wait_until_finished()
        self._manager.close()


def _on_every_process(value: int) -> list[int]:
    """`value` of each process, by process index (every process must call this together)."""
    if jax.process_count() == 1:
        return [value]
    return [int(v) for v in np.ravel(multihost_utils.process_allgather(np.int32(value)))]


def _raise_if_any_process_failed(error: str) -> None:
    """_Unverified on every process if `error` (this process's, "" for none) or another
    process's is set: every process then skips the same step."""
    failed = [i for i, code in enumerate(_on_every_process(int(bool(error)))) if code]
    if error:
        raise _Unverified(error)
    if failed:
        raise _Unverified(f"it cannot be read on process {', '.join(map(str, failed))}")


def _one_line(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text if len(text) <= 240 else text[:237] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
