"""Evaluate HEMNet: `python eval.py --config configs/voc.py --workdir DIR [--config.key=value ...]`.

Restores the workdir's latest checkpoint (or `--checkpoint PATH`, a step directory such as
DIR/checkpoints/30000) and reports mIoU, pixel accuracy and per-class IoU on the evaluation
split, whole images, over every device of every process. Prints a table and writes JSON to
DIR/eval/ (see hemnet_jax/EVAL_README.md).

  --config.eval.multi_scale=True           multi-scale (eval.scales) + flip (eval.flip)
  --config.eval.num_iters=T                T_eval (default: T_train)
  --config.eval.num_iters_sweep=1,2,3,4,6  mIoU by T_eval (the paper's Table 2), one restore
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/*.py file (with :variant); the "
                                "model config the checkpoint was trained with.", lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's workdir: its latest checkpoint is "
                    "evaluated and results go to WORKDIR/eval.")
flags.DEFINE_string("checkpoint", None, "A checkpoint step directory (WORKDIR/checkpoints/STEP) "
                    "to evaluate instead of the latest.")
flags.DEFINE_string("coordinator_address", "", "Multi-process: the coordinator's HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes in all.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not (FLAGS.workdir or FLAGS.checkpoint):
        raise app.UsageError("Pass --workdir (its latest checkpoint) or --checkpoint PATH.")
    from hemnet_jax import checkpointing, cli, eval_runner, parallel, restore

    cli.quiet_library_logs()
    parallel.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed
    )
    try:
        eval_runner.parse_sweep(FLAGS.config.eval.num_iters_sweep)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    logging.info("Config:\n%s", FLAGS.config)
    try:
        eval_runner.evaluate(FLAGS.config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint)
    except (checkpointing.CheckpointMismatchError, restore.CheckpointNotFoundError) as e:
        print(f"FATAL: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from hemnet_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
