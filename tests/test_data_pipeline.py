"""The tf.data pipelines (on synthetic_scenes/tiny: 48 train / 16 val images of 32x32)."""

import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from hemnet_jax.data import datasets, scenes
from hemnet_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD, train_augment
from hemnet_jax.data.pipeline import make_eval_dataset, make_train_dataset
from tests.data_fakes import block_colour, block_label, class_of_colour

NAME = "synthetic_scenes/tiny"
SPEC = scenes.PRESETS["tiny"]


@pytest.fixture
def data_dir(tiny_data_dir) -> str:
    """conftest's data_dir holding synthetic_scenes/tiny."""
    return tiny_data_dir


def train_batches(data_dir, count, **kwargs) -> list[dict]:
    args = dict(
        name=NAME, split="train", data_dir=data_dir, manual_dir=None, per_process_batch_size=5,
        crop_size=24, seed=7, process_index=0, process_count=1, shuffle_buffer=64,
    )  # fmt: skip
    args.update(kwargs)
    return list(tfds.as_numpy(make_train_dataset(**args).take(count)))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def denormalize(image: np.ndarray) -> np.ndarray:
    return image * np.array(IMAGENET_STD) * 255 + np.array(IMAGENET_MEAN) * 255


def test_train_batches(data_dir):
    (batch,) = train_batches(data_dir, 1, crop_size=(24, 20))
    assert batch["image"].shape == (5, 24, 20, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (5, 24, 20) and batch["label"].dtype == np.int32
    assert set(np.unique(batch["label"])) <= {*range(len(scenes.SYNTHETIC_CLASSES)), 255}
    assert -3 < batch["image"].min() < batch["image"].max() < 3  # normalised


def test_train_stream_is_a_function_of_the_seed(data_dir):
    first = train_batches(data_dir, 3)
    assert_same_batches(first, train_batches(data_dir, 3))
    other = train_batches(data_dir, 3, seed=8)
    assert not np.array_equal(first[0]["image"], other[0]["image"])
    dataset = make_train_dataset(
        name=NAME, split="train", data_dir=data_dir, manual_dir=None, per_process_batch_size=5,
        crop_size=24, seed=7, process_index=0, process_count=1, shuffle_buffer=64,
    )  # fmt: skip
    again = [list(tfds.as_numpy(dataset.take(2))) for _ in range(2)]  # re-iterating restarts
    assert_same_batches(again[0], again[1])
    assert_same_batches(again[0], first[:2])


@pytest.mark.parametrize("process_index, process_count", [(0, 1), (1, 3)])
@pytest.mark.parametrize("start_step", [1, 7, 13])
def test_resume_equals_fresh_stream(data_dir, process_index, process_count, start_step):
    # With 3 processes a shard has 16 examples: step 7 starts in epoch 2 (35 = 2 * 16 + 3).
    kwargs = dict(process_index=process_index, process_count=process_count)
    fresh = train_batches(data_dir, start_step + 4, **kwargs)
    resumed = train_batches(data_dir, 4, start_step=start_step, **kwargs)
    assert_same_batches(fresh[start_step:], resumed)


def test_resume_far_ahead_skips_epochs_without_reading_them(data_dir):
    start = time.perf_counter()
    (batch,) = train_batches(data_dir, 1, start_step=10**9)
    assert time.perf_counter() - start < 20  # 10^9 steps = 10^8 epochs, skipped arithmetically
    assert batch["image"].shape == (5, 24, 24, 3)


def fingerprint(image: np.ndarray, label: np.ndarray) -> bytes:
    return np.round(image, 3).tobytes() + label.astype(np.uint8).tobytes()


def test_train_shards_are_disjoint_and_cover_the_split(data_dir):
    whole, _ = make_eval_dataset(
        name=NAME, split="train", data_dir=data_dir, manual_dir=None, per_process_batch_size=8,
        pad_size=None, process_index=0, process_count=1,
    )  # fmt: skip
    reference = {
        fingerprint(image, label)
        for batch in tfds.as_numpy(whole)
        for image, label in zip(batch["image"], batch["label"], strict=True)
    }
    assert len(reference) == SPEC.num_train
    shards = []
    for index in range(3):  # one epoch of each process's shard, whole images, no augmentation
        batches = train_batches(
            data_dir, 4, per_process_batch_size=4, crop_size=32, scales=(1.0,), flip=False,
            process_index=index, process_count=3,
        )  # fmt: skip
        shard = [
            fingerprint(image, label)
            for batch in batches
            for image, label in zip(batch["image"], batch["label"], strict=True)
        ]
        assert len(set(shard)) == len(shard) == SPEC.num_train // 3  # an epoch: a permutation
        shards.append(set(shard))
    assert set.union(*shards) == reference
    assert sum(map(len, shards)) == len(reference)  # disjoint


def source_example(with_void: bool) -> tuple[np.ndarray, np.ndarray]:
    """A 40x48 image of 8x8 colour blocks whose colour encodes the label (block_colour)."""
    label = block_label(0, 40, 48, 7)
    image = block_colour(label)
    if with_void:
        label[8:16, 16:32] = 255
        image[8:16, 16:32] = (255, 0, 255)
    return image, label


def interior(label: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood has one label (no resampling ambiguity); the crop's
    border is excluded, its neighbours outside the crop being unknown."""
    padded = np.pad(label, 1, constant_values=-1)
    views = [padded[dy : dy + label.shape[0], dx : dx + label.shape[1]] for dy in range(3)
             for dx in range(3)]  # fmt: skip
    return np.all([v == label for v in views], axis=0)


@pytest.mark.parametrize("with_void", [False, True])
def test_augmentation_keeps_image_and_label_aligned(with_void):
    image, label = source_example(with_void)
    scales = (0.5, 0.75, 1.0, 1.25, 2.0)
    for seed in range(40):
        out = train_augment(
            tf.constant(image), tf.constant(label[..., None].astype(np.uint8)),
            tf.constant([3, seed], tf.int64), crop_size=(36, 44), scales=scales,
        )  # fmt: skip
        out_image, out_label = out["image"].numpy(), out["label"].numpy()
        assert out_image.shape == (36, 44, 3) and out_label.shape == (36, 44)
        padding = np.all(out_image == 0, axis=-1)  # zero after normalisation = padding
        # 255 only in padding or where the source had 255, and everywhere in the padding.
        assert (out_label[padding] == 255).all()
        rgb = denormalize(out_image)
        magenta = (rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] > 200)
        void = (out_label == 255) & ~padding
        if with_void:
            assert magenta[void & interior(out_label)].all()
        else:
            assert not void.any()
        # The class read back from the colour equals the label wherever it is unambiguous.
        check = interior(out_label) & (out_label != 255)
        assert check.sum() > 100
        np.testing.assert_array_equal(class_of_colour(rgb[check]), out_label[check])


def test_flip_mirrors_image_and_label_together():
    image, label = source_example(False)
    seen = set()
    for seed in range(12):
        out = train_augment(
            tf.constant(image), tf.constant(label[..., None]), tf.constant([5, seed], tf.int64),
            crop_size=label.shape, scales=(1.0,),
        )  # fmt: skip
        flipped = not np.array_equal(out["label"].numpy(), label)
        expected = label[:, ::-1] if flipped else label
        np.testing.assert_array_equal(out["label"].numpy(), expected)
        rgb = np.rint(denormalize(out["image"].numpy()))
        np.testing.assert_allclose(rgb, image[:, ::-1] if flipped else image, atol=1e-3)
        seen.add(flipped)
    assert seen == {False, True}


def test_augmentation_is_a_function_of_the_seed():
    image, label = source_example(False)
    runs = [
        train_augment(tf.constant(image), tf.constant(label[..., None]), tf.constant(s, tf.int64),
                      crop_size=(32, 32))["image"].numpy()
        for s in ([1, 2], [1, 2], [1, 3])
    ]  # fmt: skip
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


@pytest.mark.parametrize(
    "process_count, batch_size, pad_size", [(1, 4, None), (3, 3, 40), (20, 2, 32)]
)
def test_eval_scores_every_pixel_once(data_dir, process_count, batch_size, pad_size):
    ids, real_pixels, batch_counts = [], 0, set()
    for index in range(process_count):
        dataset, num_batches = make_eval_dataset(
            name=NAME, split="val", data_dir=data_dir, manual_dir=None,
            per_process_batch_size=batch_size, pad_size=pad_size, process_index=index,
            process_count=process_count,
        )  # fmt: skip
        batches = list(tfds.as_numpy(dataset))
        assert len(batches) == num_batches == len(dataset)
        batch_counts.add(num_batches)
        for batch in batches:
            size = pad_size or SPEC.height
            assert batch["image"].shape == (batch_size, size, size, 3)
            for image, label, example_id, h, w in zip(
                batch["image"], batch["label"], batch["id"], batch["height"], batch["width"],
                strict=True,
            ):  # fmt: skip
                if example_id:
                    ids.append(example_id.decode())
                    assert (h, w) == (SPEC.height, SPEC.width)
                    assert (label[:h, :w] != 255).all()  # synthetic labels have no void
                else:
                    assert h == w == 0
                outside = np.ones(label.shape, bool)
                outside[:h, :w] = False
                assert (label[outside] == 255).all() and (image[outside] == 0).all()
                real_pixels += int((label != 255).sum())
    assert len(batch_counts) == 1  # every process runs the same number of steps
    assert sorted(ids) == [f"val_{i:06d}" for i in range(SPEC.num_val)]  # each image once
    assert real_pixels == SPEC.num_val * SPEC.height * SPEC.width


def test_eval_image_larger_than_pad_size_names_it(data_dir):
    dataset, _ = make_eval_dataset(
        name=NAME, split="val", data_dir=data_dir, manual_dir=None, per_process_batch_size=2,
        pad_size=(32, 16), process_index=0, process_count=1,
    )  # fmt: skip
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"pad_size(.|\n)*val_0000"):
        next(iter(dataset))


def test_registry():
    expected = {"voc2012_aug": 21, "pascal_context": 59, "pascal_context/60": 60,
                "coco_stuff10k": 171, "synthetic_scenes": 6}  # fmt: skip
    for name, num_classes in expected.items():
        info = datasets.get_dataset_info(name)
        assert info.num_classes == num_classes == len(info.class_names)
        assert info.ignore_label == 255
    import hemnet_jax.data.builders  # noqa: F401

    for name in datasets.dataset_names():
        assert tfds.builder(name).info.full_name.startswith(name.split("/")[0])
    assert tfds.builder("pascal_context/60").builder_config.with_background
    with pytest.raises(ValueError, match="Unknown dataset 'voc'.*voc2012_aug"):
        datasets.get_dataset_info("voc")
