"""Train HEMNet: `python train.py --config configs/voc.py --workdir DIR [--config.key=value ...]`.

Data-parallel over every device of every process. A multi-host run starts one copy of this
command per host; Cloud TPU VMs, SLURM and Open MPI are detected, elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
Re-running the same command resumes from the workdir's latest checkpoint.
"""

import sys

from absl import flags, logging

from hemnet_jax import cli, trainer
from hemnet_jax.training import sharding


def define_flags() -> None:
    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and results go here.")
    flags.mark_flag_as_required("workdir")
    cli.define_distributed_flags()


def main(argv):
    cli.no_extra_arguments(argv)
    cli.quiet_library_logs()
    sharding.initialize_distributed(**cli.distributed_args())
    config = flags.FLAGS.config
    logging.info("Config:\n%s", config)
    try:
        trainer.train_and_evaluate(config, flags.FLAGS.workdir)
    except FloatingPointError as e:  # a diverged run: the message says what to do
        logging.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main, define_flags)
