"""The training state: what a checkpoint holds and a train step updates, how it is created, its
abstract shapes, and how a trained model is restored.

Training (`trainer.py`), evaluation (`evaluation/`) and the studies (`studies/`) all build and
restore state through this module, so a checkpoint means the same thing to each of them.

A checkpoint is named either by a workdir (its latest step in `<workdir>/checkpoints`) or by a
path: a step directory (`<workdir>/checkpoints/3000`) or a checkpoints directory (its latest).
The checkpoint's recorded model config is checked against the config first
(`checkpointing.CheckpointMismatchError` names every key that differs).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from jax.sharding import Mesh

from hemnet_jax.data import datasets
from hemnet_jax.errors import UserError
from hemnet_jax.models import HEMNet, create_model, frozen_param_prefixes, weights
from hemnet_jax.training import checkpointing, optim, sharding

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """step: scalar int32. params: trained by SGD. opt_state: optax state.
    batch_stats: BatchNorm running statistics. bases: the HEM units' initial bases mu0."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    batch_stats: PyTree
    bases: PyTree

    @property
    def variables(self) -> dict[str, PyTree]:
        """The model's variables, as `model.apply` takes them."""
        return {"params": self.params, "batch_stats": self.batch_stats, "bases": self.bases}

    @classmethod
    def create(cls, variables: dict[str, PyTree], opt_state: PyTree) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            opt_state=opt_state,
            batch_stats=variables.get("batch_stats", {}),
            bases=variables.get("bases", {}),
        )


def mean_bases_norm(bases: PyTree) -> jax.Array:
    """Mean L2 norm of every basis (row over C) of every HEM unit: a training health signal."""
    norms = [jnp.linalg.norm(mu, axis=-1).mean() for mu in jax.tree.leaves(bases)]
    return jnp.mean(jnp.stack(norms)) if norms else jnp.zeros(())


# ---------------------------------------------------------------------------------------------
# Creation and abstract shapes.


def _model_variables(model, key: jax.Array) -> dict[str, PyTree]:
    dummy = jnp.zeros((1, 64, 64, 3), jnp.float32)  # parameter shapes do not depend on H, W
    return model.init({"params": key, "dropout": key}, dummy, train=False)


def _new_state(variables: dict[str, PyTree], tx: optax.GradientTransformation) -> TrainState:
    return TrainState.create(dict(variables), tx.init(variables["params"]))


def _initializer(model, tx: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
    return lambda key: _new_state(_model_variables(model, key), tx)


@functools.lru_cache(maxsize=16)
def variable_shapes(model) -> dict[str, PyTree]:
    """The shapes and dtypes of `model.init`'s variables, traced once per model config (flax
    modules compare and hash by their fields): the optimiser, the abstract state and every
    restore need them, and tracing the model's init costs ~0.3 s a time. The same dict is
    returned to every caller: read it, do not modify it."""
    return jax.eval_shape(functools.partial(_model_variables, model), jax.random.PRNGKey(0))


def optimizer_for(
    config: ml_collections.ConfigDict, model
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimiser of `config.train` for `model`'s parameters (their shapes only)."""
    return optim.make_optimizer(
        config.train, variable_shapes(model)["params"], frozen=frozen_param_prefixes(config.model)
    )


def abstract_state(
    model, tx: optax.GradientTransformation, mesh: Mesh, rule: str = "replicated"
) -> TrainState:
    """The state's shapes, dtypes and shardings (`train.state_sharding`), without computing it."""
    abstract = jax.eval_shape(lambda v: _new_state(v, tx), variable_shapes(model))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        sharding.state_shardings(abstract, mesh, rule),
    )


def init_state(
    config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """Initialises variables (on device, with the state's shardings) and the optimiser state;
    loads the ImageNet backbone when `model.pretrained` names a file."""
    rule = config.train.state_sharding
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state(model, tx, mesh, rule))
    state = jax.jit(_initializer(model, tx), out_shardings=shardings)(
        jax.random.PRNGKey(config.seed)
    )
    if config.model.pretrained:
        variables = weights.load_pretrained(
            jax.device_get(state.variables), config.model.pretrained, stem=config.model.stem
        )
        variables = jax.device_put(variables, sharding.state_shardings(variables, mesh, rule))
        state = state.replace(
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            bases=variables["bases"],
        )
    return state


# ---------------------------------------------------------------------------------------------
# Restoring a trained model: eval.py, predict, visualize, the studies.


class CheckpointNotFoundError(FileNotFoundError, UserError):
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

    The optimiser state is not read: a checkpoint evaluates whatever optimiser it trained with.

    A checkpoint is verified against its recorded digest. Named by a workdir or a checkpoints
    directory, a latest step that fails is skipped (one warning line) for the newest step that
    verifies; a step directory named explicitly must verify.

    Raises:
      CheckpointNotFoundError: see `locate_checkpoint`.
      checkpointing.CheckpointMismatchError: the checkpoint's model config or dataset differs
        from `config`'s (checked first, before the model is built).
      checkpointing.NoVerifiedCheckpointError: no step tried verifies (the message lists them).
    """
    mesh = sharding.create_mesh() if mesh is None else mesh
    directory, step = locate_checkpoint(workdir, checkpoint)
    if checkpointing.check_recorded_config(config, directory, step, evaluation=True) is None:
        raise CheckpointNotFoundError(f"No checkpoint in {directory} whose metadata reads.")
    info = datasets.get_dataset_info(config.data.name)
    model = create_model(config.model, info.num_classes)
    tx, _ = optimizer_for(config, model)
    ckpt = checkpointing.Checkpointer(directory, read_only=True)
    try:
        state, _ = ckpt.restore(abstract_state(model, tx, mesh), config, step, fallback=True,
                                evaluation=True)
        step = int(jax.device_get(state.step))
    finally:
        ckpt.close()
    return Restored(
        model=model, variables=state.variables, step=int(jax.device_get(state.step)),
        path=os.path.join(directory, str(step)), run_dir=run_dir_of(directory), info=info,
    )


def run_dir_of(directory: str) -> str:
    """The run's workdir of a checkpoints directory (its parent), where results go."""
    parent, name = os.path.split(directory)
    return parent if name == "checkpoints" else directory


def _step_dirs(directory: str) -> list[str]:
    root = epath.Path(directory)
    if not root.is_dir():
        return []
    return [p.name for p in root.iterdir() if p.name.isdigit() and p.is_dir()]
