"""Build (download_and_prepare) a dataset into data_dir from the archives in manual_dir.

From Python: `prepare_dataset("voc2012_aug", data_dir=D, manual_dir=M)`. From a shell, without
the apache-beam package that the `tfds` command line needs:
`python -m hemnet_jax.data.prepare voc2012_aug --manual_dir M [--data_dir D]`.

With several hosts sharing one data_dir, build once beforehand (this command, or `tfds build`):
concurrent builds of the same dataset into one folder are not coordinated.
"""

import argparse
import contextlib
import io
import logging
from collections.abc import Sequence

import tensorflow_datasets as tfds

import hemnet_jax.data.builders  # noqa: F401  (registers the builders with TFDS)
from hemnet_jax import cli, storage
from hemnet_jax.config_check import expand_path
from hemnet_jax.data import datasets


def get_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `name` ("voc2012_aug", "pascal_context/60", ...); "" = default dir."""
    return tfds.builder(name, data_dir=data_dir or None)


def prepare_dataset(
    name: str, *, data_dir: str | None = None, manual_dir: str | None = None
) -> tfds.core.DatasetBuilder:
    """The builder of `name`, built into data_dir first if it is not there yet.

    Args:
      name: TFDS name, optionally with a config ("synthetic_scenes/tiny").
      data_dir: TFDS data_dir; None or "" = TFDS's default (~/tensorflow_datasets).
      manual_dir: the downloads; None or "" = <data_dir>/downloads/manual.

    Raises:
      sources.MissingDataError / sources.InvalidExampleError: bad or missing downloads.
    """
    builder = get_builder(name, data_dir)
    if not builder.is_prepared():
        logging.info("Building %s into %s (once: later runs read it).", name, builder.data_dir)
        # TFDS prints "Downloading and preparing dataset <size>..." and progress bars (escape
        # codes in a log): our builders download nothing, so both are dropped.
        tfds.display_progress_bar(False)
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None)
            )
        logging.info("Built %s: %s.", name, ", ".join(
            f"{split} {info.num_examples} examples" for split, info in builder.info.splits.items()
        ))
    return builder


def main(argv: Sequence[str]) -> None:
    """`python -m hemnet_jax.data.prepare NAME [--manual_dir M] [--data_dir D]`; argv[0] is the
    program."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help='e.g. voc2012_aug, pascal_context/59, "synthetic_scenes"')
    parser.add_argument("--data_dir", help="TFDS data_dir (default ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", help="the downloads (default <data_dir>/downloads/manual)")
    args = parser.parse_args(argv[1:])
    datasets.get_dataset_info(args.name)  # an unknown name: one line listing the known ones
    for key, path in (("--data_dir", args.data_dir), ("--manual_dir", args.manual_dir)):
        storage.check_tensorflow_path(path, key, write=True)  # TFDS writes through TF
        storage.check_bucket(path, key)
    builder = prepare_dataset(
        args.name,
        data_dir=expand_path(args.data_dir or ""),
        manual_dir=expand_path(args.manual_dir or ""),
    )
    print(f"{builder.info.full_name} in {builder.data_dir}")
    for split, info in builder.info.splits.items():
        print(f"  {split}: {info.num_examples} examples")


if __name__ == "__main__":
    cli.run_plain(main)
