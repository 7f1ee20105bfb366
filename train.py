"""Train HEMNet: `python train.py --config configs/voc.py --workdir DIR [--config.key=value ...]`.

Data-parallel over every device of every process. A multi-host run starts one copy of this
command per host; Cloud TPU VMs, SLURM and Open MPI are detected, elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
Re-running the same command resumes from the workdir's latest checkpoint.

Before anything is created or built, the config (every key), the files the run reads, the
workdir and a resumed checkpoint's recorded model are checked; a mistake ends in one FATAL line.
The resolved config is written to DIR/config.json, what the console shows to DIR/train.log.
"""

import os
import sys

from absl import flags, logging

from hemnet_jax import cli, config_check, storage
from hemnet_jax.data import datasets


def define_flags() -> None:
    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and results go here.")
    flags.mark_flag_as_required("workdir")
    cli.define_distributed_flags()


def check_command_line(argv: list[str]) -> None:
    """What needs neither JAX nor TensorFlow: every config value, the dataset, the files the run
    reads and the workdir (the device count and a resumed checkpoint are checked in main)."""
    cli.no_extra_arguments(argv)
    workdir = config_check.expand_path(flags.FLAGS.workdir)
    storage.check_bucket(workdir, "--workdir")  # before the first read of a gs:// workdir
    resuming = config_check.has_checkpoint(os.path.join(workdir, "checkpoints"))
    config_check.check(flags.FLAGS.config, datasets=datasets.registry(), data=True,
                       pretrained=not resuming, folders={"--workdir": workdir})


if __name__ == "__main__":  # a mistake ends here, before JAX and TensorFlow load (3-8 s)
    cli.parse_command_line(define_flags, check_command_line)

# JAX loads here; TensorFlow (tf.data, TFDS, clu) once main's checks have passed (prepare_data).
import jax  # noqa: E402

from hemnet_jax import trainer  # noqa: E402
from hemnet_jax.training import checkpointing, sharding  # noqa: E402
from hemnet_jax.training.workdir_lock import run_lock  # noqa: E402


def main(argv):
    del argv  # checked by check_command_line
    cli.quiet_library_logs()
    sharding.initialize_distributed(**cli.distributed_args())
    config, workdir = flags.FLAGS.config, config_check.expand_path(flags.FLAGS.workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    config_check.check(config, num_devices=jax.device_count())  # the rest: check_command_line
    if config_check.has_checkpoint(checkpoints):
        checkpointing.check_recorded_config(config, checkpoints)
    with run_lock(workdir):  # before anything is written to the workdir
        cli.start_run_files(config, workdir, "train", jax.process_index())
        try:
            trainer.train_and_evaluate(config, workdir, lock=False)
        except checkpointing.CheckpointSaveError as e:
            logging.flush()
            # The failed save's other writes may still be in flight in orbax's threads: an
            # orderly shutdown closes their event loop under them and each prints a traceback.
            # Everything of value is on disk (logs flushed, earlier checkpoints intact).
            print(f"FATAL: {e}", file=sys.stderr, flush=True)
            # Every process stops here together; the coordinator (process 0) must not go while
            # others still use it (they would abort): leave the distributed system together.
            jax.distributed.shutdown()
            os._exit(1)


if __name__ == "__main__":
    cli.run(main, define_flags)
