"""Train HEMNet: `python train.py --config configs/voc.py --workdir DIR [--config.key=value ...]`.

Data-parallel over every device of every process. A multi-host run starts one copy of this
command per host; Cloud TPU VMs, SLURM and Open MPI are detected, elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
Re-running the same command resumes from the workdir's latest checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file (with :variant).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and results go here.")
flags.DEFINE_string("coordinator_address", "", "Multi-process: the coordinator's HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes in all.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from hemnet_jax import cli, parallel, trainer  # after flag parsing: JAX starts up here

    cli.quiet_library_logs()

    parallel.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed
    )
    logging.info("Config:\n%s", FLAGS.config)
    try:
        trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except FloatingPointError as e:  # a diverged run: the message says what to do
        logging.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    from hemnet_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
