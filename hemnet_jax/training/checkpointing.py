"""Orbax checkpoints of the training state, with the run's model config beside it.

Each step directory holds `state` (params, optimiser state, BatchNorm statistics, HEM bases, step)
and `meta` (JSON: the model config, dataset, seed). Orbax writes into a temporary directory and
renames it when complete, so an interrupted save never replaces a good checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from hemnet_jax.errors import UserError

# Model keys that do not change what a checkpoint holds or means: a run may differ in them.
RUNTIME_ONLY_MODEL_KEYS = frozenset({"pretrained", "dtype", "remat", "aux_loss_weight"})
# Model keys added after checkpoints were first written: a checkpoint without one was trained
# with this value (the behaviour before the key existed).
ADDED_MODEL_KEYS = {"freeze_unit_conv_in": False}


def resolve_path(path: str) -> str:
    """Local paths absolute, with ~ expanded; gs:// and other URLs as given."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


class CheckpointMismatchError(ValueError, UserError):
    """A checkpoint was written by a run with another model or dataset."""


def run_metadata(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (JSON-serialisable)."""
    model = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.to_dict().items()}
    return {"model": model, "dataset": config.data.name, "seed": config.seed}


def check_compatible(saved: dict[str, Any], config: ml_collections.ConfigDict, where: str) -> None:
    """Raises CheckpointMismatchError naming every model key (and the dataset) that differs."""
    current = run_metadata(config)
    diffs = []
    for key in sorted(set(saved.get("model", {})) | set(current["model"])):
        if key in RUNTIME_ONLY_MODEL_KEYS:
            continue
        old, new = (
            saved.get("model", {}).get(key, ADDED_MODEL_KEYS.get(key, "<absent>")),
            current["model"].get(key, "<absent>"),
        )
        if old != new:
            diffs.append(f"  model.{key}: checkpoint {old!r}, config {new!r}")
    if saved.get("dataset") != current["dataset"]:
        diffs.append(
            f"  data.name: checkpoint {saved.get('dataset')!r}, config {current['dataset']!r}"
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


def has_checkpoint(directory: str) -> bool:
    """Whether `directory` (local or gs://) holds a step directory (named by its step)."""
    root = epath.Path(directory)
    return root.is_dir() and any(p.name.isdigit() and p.is_dir() for p in root.iterdir())


def check_recorded_config(
    config: ml_collections.ConfigDict, directory: str, step: int | None = None
) -> int | None:
    """Checks the run recorded with a checkpoint of `directory` (`step`, default its latest)
    against `config`, reading only its JSON, before any model or dataset is built.

    Returns:
      The step checked; None when `directory` holds no checkpoint.
    Raises:
      CheckpointMismatchError: another model or dataset; every differing key is named.
    """
    if not has_checkpoint(directory):
        return None
    ckpt = Checkpointer(directory, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is not None:
            ckpt.check_config(config, step)
    finally:
        ckpt.close()
    return step


class Checkpointer:
    """A `CheckpointManager` over `<workdir>/checkpoints`: save every N steps, keep the last K,
    asynchronously."""

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
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(  # read-only: no saving, no pruning
                save_interval_steps=0 if read_only else max(every, 1),
                max_to_keep=None if read_only else keep,
                enable_async_checkpointing=asynchronous,
                create=not read_only,
                read_only=read_only,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving (in the background) if `step` is on the cadence or `force`."""
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )
        if saved:
            logging.info("Saving checkpoint of step %d to %s.", step, self.directory)
        return saved

    def restore(
        self, abstract_state: Any, config: ml_collections.ConfigDict, step: int | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Restores `step` (default: the latest) into the shapes and shardings of
        `abstract_state` after checking the run's metadata against `config`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        where = os.path.join(self.directory, str(step))
        meta = self.check_config(config, step)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except (ValueError, KeyError) as e:
            raise CheckpointMismatchError(
                f"The checkpoint {where} does not fit this model's variables: {e}"
            ) from e
        return restored["state"], meta

    def check_config(self, config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
        """The run metadata recorded with `step` (JSON only, no state read), after checking it
        against `config` (CheckpointMismatchError names every key that differs)."""
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        check_compatible(meta["meta"], config, os.path.join(self.directory, str(step)))
        return meta["meta"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def reached_preemption(self, step: int) -> bool:
        """True on every process once a multi-host preemption notice has arrived (JAX's
        coordination service); always False in a single-process run."""
        return jax.process_count() > 1 and self._manager.reached_preemption(step)
