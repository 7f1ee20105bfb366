"""Training input pipeline throughput: examples/s with EMANet's full augmentation, per core.

Decodes VOC-sized JPEGs (synthetic_scenes/large: 375x500, built here in a few seconds), random
scale from {0.5, ..., 2.0}, pad, random crop 513x513, flip, ImageNet normalisation, batching.
The per-core figure tells how many host cores keep an accelerator fed: cores needed =
(accelerator examples/s) / (examples/s per core).

  python benchmarks/input_pipeline.py [--threads 1,2] [--json PATH] [--data_dir DIR]
"""

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import common
import tensorflow as tf
import tensorflow_datasets as tfds

from hemnet_jax.data.augment import DEFAULT_SCALES
from hemnet_jax.data.pipeline import make_train_dataset
from hemnet_jax.data.prepare import prepare_dataset


def measure(args: argparse.Namespace, threads: int) -> dict:
    """Examples/s of the training pipeline on `threads` tf.data threads."""
    dataset = make_train_dataset(
        name=args.dataset,
        split="train",
        data_dir=args.data_dir,
        manual_dir=None,
        per_process_batch_size=args.batch_size,
        crop_size=args.crop_size,
        scales=DEFAULT_SCALES,
        seed=0,
        process_index=0,
        process_count=1,
        num_threads=threads,
    )
    batches = iter(tfds.as_numpy(dataset))
    for _ in range(args.warmup_batches):
        next(batches)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    seconds = time.perf_counter() - start
    examples_per_s = args.batches * args.batch_size / seconds
    return {
        "threads": threads,
        "examples_per_s": round(examples_per_s, 2),
        "examples_per_s_per_core": round(examples_per_s / threads, 2),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic_scenes/large")
    parser.add_argument("--data_dir", default=str(Path(tempfile.gettempdir(), "hemnet_jax_tfds")))
    parser.add_argument("--crop_size", type=int, default=513)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per setting")
    parser.add_argument("--warmup_batches", type=int, default=5)
    parser.add_argument(
        "--threads", default=",".join(sorted({"1", str(cores)})), help="comma-separated counts"
    )
    parser.add_argument("--json", default="benchmarks/results/input_pipeline.json")
    args = parser.parse_args()

    builder = prepare_dataset(args.dataset, data_dir=args.data_dir)
    image_shape = next(iter(tfds.as_numpy(builder.as_dataset(split="train").take(1))))["image"]
    rows = [measure(args, int(t)) for t in args.threads.split(",")]

    print(
        f"\n{args.dataset} ({image_shape.shape[1]}x{image_shape.shape[0]} JPEG) -> crop "
        f"{args.crop_size}, scales {DEFAULT_SCALES}, flip, batch {args.batch_size}; "
        f"{cores} cores available"
    )
    print(f"{'threads':>8} {'examples/s':>11} {'per core':>9}")
    for row in rows:
        print(
            f"{row['threads']:>8} {row['examples_per_s']:>11.1f} "
            f"{row['examples_per_s_per_core']:>9.1f}"
        )
    result = {
        "benchmark": "input_pipeline",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dataset": args.dataset,
        "image_size_hw": list(image_shape.shape[:2]),
        "crop_size": args.crop_size,
        "scales": list(DEFAULT_SCALES),
        "batch_size": args.batch_size,
        "cores_available": cores,
        "cpu": common.cpu_model(),
        "tensorflow": tf.__version__,
        "results": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
