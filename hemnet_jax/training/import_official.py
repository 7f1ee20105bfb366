"""A network trained by the official EMANet code (or a PyTorch HEMNet in its layout) as a
training checkpoint `<workdir>/checkpoints/<step>`, which eval.py, predict, visualize and the
gradient study restore like any checkpoint train.py writes.

    python -m hemnet_jax.models.weights import-emanet step_30000.pth \
        --config configs/voc.py:emanet --workdir DIR

(the weights program hands that over to `python -m hemnet_jax.training.import_official`, this
module). The state dict's keys are EMANet's `network.py` names (`models.official`); the config
gives the architecture and the unit's math. The optimiser state is freshly initialised, so
train.py on DIR continues from the imported step.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from jax.sharding import Mesh

from hemnet_jax import cli, config_check
from hemnet_jax.data import datasets
from hemnet_jax.errors import UserError
from hemnet_jax.models import create_model, official, weights
from hemnet_jax.training import checkpointing, sharding
from hemnet_jax.training.state import TrainState, abstract_state, optimizer_for


class ImportSettingError(ValueError, UserError):
    """A config setting the official network cannot have."""


class ExistingCheckpointError(FileExistsError, UserError):
    """The workdir holds checkpoints already."""


def import_official(
    config: ml_collections.ConfigDict,
    path: str,
    workdir: str,
    *,
    step: int | None = None,
    mesh: Mesh | None = None,
) -> str:
    """Writes the official-layout checkpoint `path` as `<workdir>/checkpoints/<step>`, reads it
    back and checks it holds what was written.

    Args:
      config: the run's config; its model must be the one the file was trained with.
      path: a .pth ({'net': state_dict, 'step': N} as EMANet's train.py saves it, or a bare
        state dict; DataParallel's "module." prefix is accepted) or a .safetensors file.
      workdir: a workdir without checkpoints.
      step: the step to record; default the file's 'step', else 0.
      mesh: the devices the state is laid out on (default: all).
    Returns:
      The checkpoint's step directory.
    Raises:
      official.MismatchError: the file does not fit the configured model (one line).
      FileExistsError: the workdir holds checkpoints already.
      ValueError: a config the official layout cannot express (the auxiliary head).
    """
    if config.model.aux_head:
        raise ImportSettingError(
            "model.aux_head=True: the official network has no auxiliary head; import with "
            "--config.model.aux_head=False."
        )
    directory = os.path.join(checkpointing.resolve_path(workdir), "checkpoints")
    root = epath.Path(directory)
    if root.is_dir() and any(p.name.isdigit() for p in root.iterdir()):
        raise ExistingCheckpointError(
            f"{directory} holds checkpoints already: import into a new --workdir."
        )
    state_dict, file_step = weights.read_checkpoint(path)
    step = (file_step or 0) if step is None else step
    mesh = sharding.create_mesh() if mesh is None else mesh
    model = create_model(config.model, datasets.get_dataset_info(config.data.name).num_classes)
    tx, _ = optimizer_for(config, model)
    abstract = abstract_state(model, tx, mesh, config.train.state_sharding)
    variables = official.convert(
        state_dict, abstract.variables, stem=config.model.stem, source=path
    )
    state = TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=variables["params"],
        opt_state=tx.init(variables["params"]),
        batch_stats=variables["batch_stats"],
        bases=variables["bases"],
    )
    state = jax.device_put(state, jax.tree.map(lambda a: a.sharding, abstract))

    # Nothing is written before here: a file that does not fit leaves no trace.
    where = os.path.join(directory, str(step))
    ckpt = checkpointing.Checkpointer(directory, asynchronous=False)
    try:
        ckpt.save(step, state, checkpointing.run_metadata(config), force=True)
        ckpt.wait()
        restored, _ = ckpt.restore(abstract, config, step)
    finally:
        ckpt.close()
    if not all(jax.tree.leaves(jax.tree.map(_same, state, restored))):
        raise OSError(f"The checkpoint {where} does not read back what was written.")
    return where


def _same(a: jax.Array, b: jax.Array) -> bool:
    return bool(np.array_equal(jax.device_get(a), jax.device_get(b)))


# ---------------------------------------------------------------------------------------------
# The program.


def define_flags() -> None:
    cli.define_config_flag("A configs/*.py file (with :variant): the model the file holds.")
    flags.DEFINE_string("workdir", None, "A new workdir: the checkpoint goes to DIR/checkpoints.")
    flags.DEFINE_integer("step", None, "The step to record (default: the file's, else 0).")
    flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError(
            f"Pass one checkpoint file: python -m hemnet_jax.models.weights {weights.IMPORT_USAGE}"
        )
    path = argv[1]
    cli.quiet_library_logs()
    config, workdir = flags.FLAGS.config, config_check.expand_path(flags.FLAGS.workdir)
    config_check.check(config, datasets=datasets.registry(), folders={"--workdir": workdir})
    if not os.path.isfile(path):
        raise weights.WeightsFileError(f"{path}: no such file.")
    print(f"Wrote {import_official(config, path, workdir, step=flags.FLAGS.step)}.")


if __name__ == "__main__":
    cli.run(main, define_flags)
