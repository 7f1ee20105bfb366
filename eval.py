"""Evaluate HEMNet: `python eval.py --config configs/voc.py --workdir DIR [--config.key=value ...]`.

Restores the workdir's latest checkpoint (or `--checkpoint PATH`, a step directory such as
DIR/checkpoints/30000) and reports mIoU, pixel accuracy and per-class IoU on the evaluation
split, whole images, over every device of every process. Prints a table and writes JSON to
DIR/eval/, or to OUT/eval/ with `--output_dir OUT` (e.g. for a run you cannot write to); see
docs/evaluation.md.

  --config.eval.multi_scale=True           multi-scale (eval.scales) + flip (eval.flip)
  --config.eval.num_iters=T                T_eval (default: T_train)
  --config.eval.num_iters_sweep=1,2,3,4,6  mIoU by T_eval (the paper's Table 2), one restore

The config, then the checkpoint's recorded model and dataset, then the dataset's files are
checked before any dataset is touched; a mistake ends in one FATAL line.
"""

import os

from absl import flags

from hemnet_jax import cli, config_check, storage
from hemnet_jax.data import datasets


def define_flags() -> None:
    cli.define_config_flag("A configs/*.py file (with :variant): the config it was trained with.")
    cli.define_checkpoint_flags()
    flags.DEFINE_string("output_dir", None, "Write eval/ here instead of into the run's workdir.")
    cli.define_distributed_flags()


def check_command_line(argv: list[str]) -> None:
    """What needs neither JAX nor TensorFlow: the flags, every config value, the dataset's name
    (the device count, the checkpoint and the dataset's files are checked in main)."""
    cli.no_extra_arguments(argv)
    cli.require_checkpoint_source()
    config_check.check(flags.FLAGS.config, datasets=datasets.registry())


if __name__ == "__main__":  # a mistake ends here, before JAX and TensorFlow load (3-8 s)
    cli.parse_command_line(define_flags, check_command_line)

# JAX loads here; TensorFlow (tf.data, TFDS) once main's checks have passed (prepare_data).
import jax  # noqa: E402

from hemnet_jax.evaluation import runner  # noqa: E402
from hemnet_jax.training import checkpointing, sharding, state  # noqa: E402


def main(argv):
    del argv  # checked by check_command_line
    cli.quiet_library_logs()
    sharding.initialize_distributed(**cli.distributed_args())
    f, config = flags.FLAGS, flags.FLAGS.config
    workdir, checkpoint, output_dir = (config_check.expand_path(p) if p else p
                                       for p in (f.workdir, f.checkpoint, f.output_dir))
    for key, path in (("--workdir", workdir), ("--checkpoint", checkpoint)):
        storage.check_bucket(path, key)  # before the first read of a gs:// path
    directory, step = state.locate_checkpoint(workdir, checkpoint)
    results = os.path.join(output_dir or workdir or state.run_dir_of(directory), "eval")
    registry = datasets.registry()
    config_check.check(config, datasets=registry, num_devices=jax.device_count(),
                       folders={"--output_dir": results})
    checkpointing.check_recorded_config(config, directory, step, evaluation=True)
    config_check.check(config, datasets=registry, data=True)
    runner.evaluate(config, workdir=workdir, checkpoint=checkpoint, output_dir=output_dir)


if __name__ == "__main__":
    cli.run(main, define_flags)
