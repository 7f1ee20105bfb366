"""tf.data input pipelines: augmented training crops and padded whole-image evaluation batches.

The per-example operations are in `augment.py`. Each process reads only its shard of the
split. The stream is a pure function of (seed, process_index, process_count) and
the step: epoch e is shuffled with a seed derived from (seed, e), example number p of the
process's stream is augmented with stateless random ops seeded by (seed, p), so the result does
not depend on parallelism, and `start_step` resumes it exactly, skipping whole epochs
arithmetically and the rest of an epoch before decoding.

Images are decoded as PIL decodes them (`decode.py`), as the official EMANet code does.
TensorFlow never sees an accelerator (see `tf_devices.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import tensorflow_datasets as tfds

from hemnet_jax.data.augment import DEFAULT_SCALES, eval_pad, train_augment
from hemnet_jax.data.classes import IGNORE_LABEL
from hemnet_jax.data.decode import decode_rgb
from hemnet_jax.data.prepare import prepare_dataset
from hemnet_jax.data.tf_devices import tensorflow

if TYPE_CHECKING:  # imported when first used (tf_devices.tensorflow)
    import tensorflow as tf


_INT64_MAX = np.iinfo(np.int64).max


def make_train_dataset(
    *,
    name: str,
    split: str,
    data_dir: str | None,
    manual_dir: str | None,
    per_process_batch_size: int,
    crop_size: int | tuple[int, int],
    scales: Sequence[float] = DEFAULT_SCALES,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle_buffer: int = 1024,
    flip: bool = True,
    num_threads: int | None = None,
) -> tf.data.Dataset:
    """Infinite stream of augmented training batches of this process's shard.

    Args:
      name: TFDS name ("voc2012_aug", "synthetic_scenes/tiny", ...); built from manual_dir into
        data_dir first if it is not there.
      split: e.g. "train_aug"; each process reads 1/process_count of it.
      data_dir, manual_dir: see `prepare_dataset` (None or "" = TFDS's defaults).
      per_process_batch_size: examples per batch on this process.
      crop_size: training crop, int or (height, width).
      scales: random scale factors, one drawn uniformly per example.
      seed: the stream is a function of (seed, process_index, process_count).
      start_step: the first batch is batch number start_step of a fresh stream (exact resume).
      process_index, process_count: default jax.process_index() / jax.process_count().
      shuffle_buffer: examples in the shuffle buffer (encoded, capped at the shard size).
      flip: random horizontal flip.
      num_threads: tf.data threads (None = one per core).

    Returns:
      Dataset of {"image": float32 [B, H, W, 3] normalised, 0 in padding,
                  "label": int32 [B, H, W], 255 = ignore (padding, void)}.
    """
    tf = tensorflow()
    crop = _pair(crop_size, "crop_size")
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive, got {scales}")
    if per_process_batch_size < 1 or start_step < 0 or shuffle_buffer < 1:
        raise ValueError(f"bad {per_process_batch_size=}, {start_step=} or {shuffle_buffer=}")
    builder = prepare_dataset(name, data_dir=data_dir, manual_dir=manual_dir)
    index, count = _process(process_index, process_count)
    shard = tfds.split_for_jax_process(split, process_index=index, process_count=count)
    num_examples = builder.info.splits[shard].num_examples
    if num_examples == 0:
        raise ValueError(f"{name} {split}: no examples for process {index} of {count}")

    records = builder.as_dataset(
        split=shard,
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()},
    ).map(_as_written(lambda ex: {"image": ex["image"], "label": ex["label"]}))
    shuffle_key, augment_key = _stream_keys(seed, index, count)
    buffer_size = min(shuffle_buffer, num_examples)

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        epoch_seed = tf.random.stateless_uniform(
            [], seed=tf.stack([tf.constant(shuffle_key, tf.int64), e]),
            minval=0, maxval=2**31 - 1, dtype=tf.int64,
        )  # fmt: skip
        return records.shuffle(buffer_size, seed=epoch_seed, reshuffle_each_iteration=False)

    first = start_step * per_process_batch_size  # position of the first example in the stream
    first_epoch, skipped = divmod(first, num_examples)
    stream = tf.data.Dataset.range(first_epoch, _INT64_MAX).flat_map(_as_written(epoch))
    stream = stream.skip(skipped)
    features = builder.info.features

    def preprocess(position: tf.Tensor, record: dict) -> dict:
        image = decode_rgb(record["image"])
        label = features["label"].decode_example(record["label"])
        seed_pair = tf.stack([tf.constant(augment_key, tf.int64), position])
        return train_augment(image, label, seed_pair, crop_size=crop, scales=scales, flip=flip)

    ds = tf.data.Dataset.zip(tf.data.Dataset.range(first, _INT64_MAX), stream)
    ds = ds.map(_as_written(preprocess), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_process_batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(num_threads))


def make_eval_dataset(
    *,
    name: str,
    split: str,
    data_dir: str | None,
    manual_dir: str | None,
    per_process_batch_size: int,
    pad_size: int | tuple[int, int] | None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
    pad_stride: int | None = None,
) -> tuple[tf.data.Dataset, int]:
    """This process's share of a split: whole images, padded, every real pixel once overall.

    Every process yields the same number of batches (multi-host steps must match); the last are
    completed with padding examples (label all 255, height = width = 0). Nothing is dropped.
    With pad_stride (the official evaluation), each image is padded to its own
    `augment.official_padded_size` instead, one image per batch; a process then yields its own
    shard only (no padding examples: each process evaluates alone, see
    `evaluation.validation`) and num_batches is its number of images.

    Args:
      name, split, data_dir, manual_dir, process_index, process_count, num_threads: as in
        make_train_dataset.
      per_process_batch_size: examples per batch on this process.
      pad_size: every image is padded at the bottom and right to this (height, width); None =
        the largest image of the split (one pass over the labels to find it). Unused with
        pad_stride.
      pad_stride: pad each image to the next size with size % pad_stride == 1 (the output
        stride); per_process_batch_size must then be 1.

    Returns:
      (dataset, num_batches). Batches: {"image": float32 [B, PH, PW, 3] normalised, 0 in
      padding, "label": int32 [B, PH, PW] (255 = ignore and padding), "id": string [B] ("" for
      padding examples), "height", "width": int32 [B], the image size before padding}.
      Iterating raises InvalidArgumentError naming the image if one is larger than pad_size.
    """
    tf = tensorflow()
    if per_process_batch_size < 1:
        raise ValueError(f"bad {per_process_batch_size=}")
    builder = prepare_dataset(name, data_dir=data_dir, manual_dir=manual_dir)
    index, count = _process(process_index, process_count)
    total = builder.info.splits[split].num_examples
    shard = tfds.split_for_jax_process(split, process_index=index, process_count=count)
    num_examples = builder.info.splits[shard].num_examples
    largest_shard = -(-total // count)  # even splits: the first shards hold one more
    decoders = {"image": tfds.decode.SkipDecoding()}

    def decoded(example: dict) -> dict:
        return {**example, "image": decode_rgb(example["image"])}

    if pad_stride is not None:
        if per_process_batch_size != 1:
            raise ValueError("Official evaluation padding evaluates one image at a time.")
        ds = builder.as_dataset(
            split=shard, shuffle_files=False, decoders=decoders,
            read_config=tfds.ReadConfig(try_autocache=False),
        )
        ds = ds.map(
            _as_written(lambda ex: eval_pad(**_eval_fields(decoded(ex)), pad_stride=pad_stride)),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
        )
        ds = ds.batch(1).apply(tf.data.experimental.assert_cardinality(num_examples))
        return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(num_threads)), num_examples

    num_batches = -(-largest_shard // per_process_batch_size)
    pad = _pair(pad_size, "pad_size") if pad_size is not None else max_image_size(builder, split)

    def preprocess(example: dict) -> dict:
        return eval_pad(**_eval_fields(decoded(example)), pad_size=pad)

    padding = tf.data.Dataset.from_tensors(_padding_example(pad))
    padding = padding.repeat(num_batches * per_process_batch_size - num_examples)
    if num_examples:
        # No TFDS auto-cache: each validation builds its dataset anew, so a cache is never
        # reused, and a partial read (eval.max_batches) makes tf.data warn about it.
        ds = builder.as_dataset(
            split=shard, shuffle_files=False, decoders=decoders,
            read_config=tfds.ReadConfig(try_autocache=False),
        )
        ds = ds.map(_as_written(preprocess), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
        ds = ds.concatenate(padding)
    else:
        ds = padding
    ds = ds.batch(per_process_batch_size, drop_remainder=True)
    ds = ds.apply(tf.data.experimental.assert_cardinality(num_batches))
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(num_threads)), num_batches


def _as_written(fn):
    """`fn` for tf.data's map without AutoGraph's conversion: these functions branch on tensors
    with tf.cond only (their Python `if`s are on shapes and arguments), so AutoGraph's rewrite
    of their source, and of the augmentation's, changes nothing and took about 0.5 s of
    train.py's start on the tiny config (py-spy, main thread)."""
    return tensorflow().autograph.experimental.do_not_convert(fn)


def max_image_size(builder: tfds.core.DatasetBuilder, split: str) -> tuple[int, int]:
    """(largest height, largest width) over a split, from one pass over its labels."""
    tf = tensorflow()
    ds = builder.as_dataset(
        split=split, decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False
    )
    sizes = ds.map(_as_written(lambda ex: tf.shape(ex["label"])[:2]),
                   num_parallel_calls=tf.data.AUTOTUNE)
    largest = sizes.reduce(tf.zeros([2], tf.int32), tf.maximum).numpy()
    return int(largest[0]), int(largest[1])


def _eval_fields(example: dict) -> dict:
    return {"image": example["image"], "label": example["label"], "example_id": example["id"]}


def _padding_example(pad_size: tuple[int, int]) -> dict[str, tf.Tensor]:
    tf = tensorflow()
    ph, pw = pad_size
    return {
        "image": tf.zeros([ph, pw, 3], tf.float32),
        "label": tf.fill([ph, pw], IGNORE_LABEL),
        "id": tf.constant(""),
        "height": tf.constant(0),
        "width": tf.constant(0),
    }


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    if index is None or count is None:
        import jax  # Only for the defaults; the pipeline itself never touches JAX.

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} not in [0, process_count={count})")
    return index, count


def _stream_keys(seed: int, index: int, count: int) -> tuple[int, int]:
    """Two independent int64 keys (shuffle, augmentation) from (seed, process)."""
    words = np.random.SeedSequence([seed % 2**63, index, count]).generate_state(4, np.uint64)
    return int(words[0] >> np.uint64(1)), int(words[1] >> np.uint64(1))


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{what} must be a positive int or (height, width), got {size}")
    return int(pair[0]), int(pair[1])


def _options(num_threads: int | None) -> tf.data.Options:
    tf = tensorflow()
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    if num_threads:
        options.threading.private_threadpool_size = num_threads
    return options
