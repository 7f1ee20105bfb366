"""Restoring a trained model for evaluation, prediction and pictures: eval.py, predict, visualize.

A checkpoint is named either by a workdir (its latest step in `<workdir>/checkpoints`) or by a
path: a step directory (`<workdir>/checkpoints/3000`) or a checkpoints directory (its latest).
The checkpoint's recorded model config is checked against the config first
(`checkpointing.CheckpointMismatchError` names every key that differs).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

from hemnet_jax import checkpointing, parallel, trainer
from hemnet_jax.data import datasets
from hemnet_jax.models import HEMNet, create_model


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint where the user pointed."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """A trained model ready for `model.apply(variables, images, train=False)`.

    Attributes:
      model: the HEMNet of `config.model`.
      variables: {"params", "batch_stats", "bases"}, replicated over the mesh.
      step: the training step of the checkpoint.
      path: the checkpoint's step directory.
      run_dir: the run's workdir (the parent of `checkpoints/`), where results are written.
      info: the dataset's DatasetInfo (class names, number of classes).
    """

    model: HEMNet
    variables: dict
    step: int
    path: str
    run_dir: str
    info: datasets.DatasetInfo


def locate_checkpoint(workdir: str | None = None,
                      checkpoint: str | None = None) -> tuple[str, int | None]:
    """(checkpoints directory, step or None for its latest) from a workdir or a path.

    Raises:
      CheckpointNotFoundError: nothing given, or nothing there; the message says what to pass.
    """
    if checkpoint:
        path = checkpointing.resolve_path(checkpoint.rstrip("/"))
        if not epath.Path(path).is_dir():
            raise CheckpointNotFoundError(
                f"--checkpoint {checkpoint!r}: no such directory. Pass a step directory such "
                "as <workdir>/checkpoints/3000, or a checkpoints directory for its latest step."
            )
        name = os.path.basename(path)
        if name.isdigit():
            return os.path.dirname(path), int(name)
        if not _step_dirs(path):
            raise CheckpointNotFoundError(
                f"--checkpoint {checkpoint!r} is neither a step directory (named by its step, "
                "e.g. <workdir>/checkpoints/3000) nor a directory of them."
            )
        return path, None
    if not workdir:
        raise CheckpointNotFoundError("Pass --workdir (its latest checkpoint) or --checkpoint.")
    directory = os.path.join(checkpointing.resolve_path(workdir), "checkpoints")
    if not _step_dirs(directory):
        raise CheckpointNotFoundError(
            f"No checkpoint in {directory}: train first (python train.py --workdir "
            f"{workdir} ...), or pass --checkpoint."
        )
    return directory, None


def restore_for_eval(
    config: ml_collections.ConfigDict, *, workdir: str | None = None,
    checkpoint: str | None = None, mesh: Mesh | None = None,
) -> Restored:
    """Restores the model variables of a training checkpoint (see `locate_checkpoint`).

    The optimiser state is restored too (the checkpoint's tree includes it) and then dropped.

    Raises:
      CheckpointNotFoundError: see `locate_checkpoint`.
      checkpointing.CheckpointMismatchError: the checkpoint's model config or dataset differs
        from `config`'s, or its variables do not fit the model.
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    directory, step = locate_checkpoint(workdir, checkpoint)
    info = datasets.get_dataset_info(config.data.name)
    model = create_model(config.model, info.num_classes)
    tx, _ = trainer.optimizer_for(config, model)
    ckpt = checkpointing.Checkpointer(directory, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointNotFoundError(f"No checkpoint in {directory}.")
        state, _ = ckpt.restore(trainer.abstract_state(model, tx, mesh), config, step)
    finally:
        ckpt.close()
    parent, name = os.path.split(directory)
    run_dir = parent if name == "checkpoints" else directory
    return Restored(
        model=model, variables=state.variables, step=int(jax.device_get(state.step)),
        path=os.path.join(directory, str(step)), run_dir=run_dir, info=info,
    )


def _step_dirs(directory: str) -> list[str]:
    root = epath.Path(directory)
    if not root.is_dir():
        return []
    return [p.name for p in root.iterdir() if p.name.isdigit() and p.is_dir()]
