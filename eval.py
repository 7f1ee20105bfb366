"""Evaluate HEMNet: `python eval.py --config configs/voc.py --workdir DIR [--config.key=value ...]`.

Restores the workdir's latest checkpoint (or `--checkpoint PATH`, a step directory such as
DIR/checkpoints/30000) and reports mIoU, pixel accuracy and per-class IoU on the evaluation
split, whole images, over every device of every process. Prints a table and writes JSON to
DIR/eval/ (see docs/evaluation.md).

  --config.eval.multi_scale=True           multi-scale (eval.scales) + flip (eval.flip)
  --config.eval.num_iters=T                T_eval (default: T_train)
  --config.eval.num_iters_sweep=1,2,3,4,6  mIoU by T_eval (the paper's Table 2), one restore
"""

import sys

from absl import app, flags, logging

from hemnet_jax import cli
from hemnet_jax.evaluation import runner
from hemnet_jax.training import checkpointing, sharding, state


def define_flags() -> None:
    cli.define_config_flag("A configs/*.py file (with :variant): the config it was trained with.")
    cli.define_checkpoint_flags()
    cli.define_distributed_flags()


def main(argv):
    cli.no_extra_arguments(argv)
    cli.require_checkpoint_source()
    cli.quiet_library_logs()
    sharding.initialize_distributed(**cli.distributed_args())
    config = flags.FLAGS.config
    try:
        runner.parse_sweep(config.eval.num_iters_sweep)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    logging.info("Config:\n%s", config)
    try:
        runner.evaluate(config, workdir=flags.FLAGS.workdir, checkpoint=flags.FLAGS.checkpoint)
    except (checkpointing.CheckpointMismatchError, state.CheckpointNotFoundError) as e:
        print(f"FATAL: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main, define_flags)
