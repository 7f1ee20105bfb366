"""The embedded synthetic_scenes dataset: deterministic, built by TFDS, not solvable by colour."""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from hemnet_jax.data import scenes
from hemnet_jax.data.prepare import prepare_dataset


def test_builds_through_tfds(tmp_path):
    builder = prepare_dataset("synthetic_scenes/tiny", data_dir=str(tmp_path))
    spec = scenes.PRESETS["tiny"]
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
        "train": spec.num_train,
        "val": spec.num_val,
    }
    examples = {e["id"].decode(): e for e in tfds.as_numpy(builder.as_dataset(split="val"))}
    image, label = scenes.render(spec, "val", 3)
    np.testing.assert_array_equal(examples["val_000003"]["image"], image)  # PNG: lossless
    np.testing.assert_array_equal(examples["val_000003"]["label"][..., 0], label)


def test_deterministic_from_the_seed():
    spec = scenes.PRESETS["default"]
    a, b = scenes.render(spec, "train", 5), scenes.render(spec, "train", 5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    other = scenes.render(dataclasses.replace(spec, seed=1), "train", 5)
    assert not np.array_equal(a[0], other[0])
    assert not np.array_equal(a[0], scenes.render(spec, "val", 5)[0])


def render_many(spec, split, count):
    images, labels = zip(*(scenes.render(spec, split, i) for i in range(count)), strict=True)
    return np.stack(images), np.stack(labels)


def colour_oracle_miou(train, val, num_classes, bits=4) -> float:
    """mIoU on val of the best per-pixel classifier of quantised colour fitted on train."""

    def bins(images):
        q = (images >> (8 - bits)).astype(np.int64)
        return (q[..., 0] << (2 * bits)) | (q[..., 1] << bits) | q[..., 2]

    counts = np.zeros((1 << (3 * bits), num_classes))
    np.add.at(counts, (bins(train[0]).ravel(), train[1].ravel()), 1)
    prediction = counts.argmax(1)[bins(val[0])]
    ious = [
        ((prediction == k) & (val[1] == k)).sum()
        / max(((prediction == k) | (val[1] == k)).sum(), 1)
        for k in range(num_classes)
    ]
    return float(np.mean(ious))


def test_colour_alone_cannot_solve_it():
    spec = scenes.PRESETS["default"]
    num_classes = len(scenes.SYNTHETIC_CLASSES)
    train, val = render_many(spec, "train", 150), render_many(spec, "val", 60)
    objects = (val[1] > 0).mean()
    assert 0.1 < objects < 0.5 and set(np.unique(val[1])) == set(range(num_classes))
    # Predicting background everywhere scores IoU = background fraction on class 0 only.
    assert colour_oracle_miou(train, val, num_classes) < 0.2

    # Control: the same scenes with objects painted in a colour per class are solved by colour.
    def colour_coded(data):
        images, labels = data[0].copy(), data[1]
        images[labels > 0] = scenes.PALETTE[labels[labels > 0]].astype(np.uint8)
        return images, labels

    assert colour_oracle_miou(colour_coded(train), colour_coded(val), num_classes) > 0.6
