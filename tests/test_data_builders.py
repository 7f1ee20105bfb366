"""The TFDS builders, each over a tiny fake download laid out like the real one."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from hemnet_jax.data import classes, decode, sources
from hemnet_jax.data.palette import to_palette_image, voc_palette
from hemnet_jax.data.prepare import prepare_dataset
from tests.data_fakes import (
    class_of_colour,
    write_coco_stuff10k,
    write_pascal_context,
    write_sbd,
    write_voc2012,
)

REPO = Path(__file__).resolve().parents[1]

VOC_TRAIN = ["2007_000032", "2007_000039", "2008_000002"]
VOC_VAL = ["2007_000033", "2007_000042"]
# SBD lists overlap VOC train (2007_000032, 2008_000002) and VOC val (2007_000033, 2007_000042).
SBD_TRAIN = ["2008_000003", "2008_000008", "2007_000032", "2007_000033"]
SBD_VAL = ["2008_000015", "2007_000042", "2008_000002"]
TRAIN_AUG = sorted({*VOC_TRAIN, "2008_000003", "2008_000008", "2008_000015"})


def examples(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, dict]:
    return {ex["id"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


def write_voc_aug(manual: Path, archive: bool) -> tuple[dict, dict]:
    voc = write_voc2012(manual, train=VOC_TRAIN, val=VOC_VAL, archive=archive)
    sbd = write_sbd(manual, train=SBD_TRAIN, val=SBD_VAL, archive=archive)
    return voc, sbd


@pytest.mark.parametrize("archive", [True, False], ids=["archives", "extracted"])
def test_voc2012_aug(tmp_path, archive):
    voc_labels, sbd_labels = write_voc_aug(tmp_path / "manual", archive)
    builder = prepare_dataset(
        "voc2012_aug", data_dir=str(tmp_path / "data"), manual_dir=str(tmp_path / "manual")
    )
    splits = {s: examples(builder, s) for s in ("train_aug", "train", "val")}
    assert sorted(splits["train_aug"]) == TRAIN_AUG  # SBD + VOC train, no VOC val image
    assert not set(splits["train_aug"]) & set(VOC_VAL)
    assert sorted(splits["train"]) == sorted(VOC_TRAIN)
    assert sorted(splits["val"]) == sorted(VOC_VAL)
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
        "train_aug": len(TRAIN_AUG),
        "train": len(VOC_TRAIN),
        "val": len(VOC_VAL),
    }
    for split, exs in splits.items():
        for example_id, ex in exs.items():
            # VOC's PNG label wherever VOC has one (ids also in SBD included), else SBD's .mat.
            expected = voc_labels.get(example_id)
            if expected is None:
                assert split == "train_aug"
                expected = sbd_labels[example_id]
            np.testing.assert_array_equal(ex["label"][..., 0], expected)
            assert ex["image"].shape == (*expected.shape, 3) and ex["image"].dtype == np.uint8
            real = expected != 255
            np.testing.assert_array_equal(class_of_colour(ex["image"])[real], expected[real])
    # The VOC void border survives as 255; SBD labels have none.
    assert (splits["val"][VOC_VAL[0]]["label"][0] == 255).all()


def test_palette_png_decodes_to_indices(tmp_path):
    label = np.array([[0, 1, 15], [20, 255, 7]], np.uint8)
    path = tmp_path / "label.png"
    to_palette_image(label).save(path)
    with Image.open(path) as image:
        assert image.mode == "P"
        colours = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(colours[0, 1], [128, 0, 0])  # the real VOC palette
    np.testing.assert_array_equal(colours[1, 1], [224, 224, 192])
    np.testing.assert_array_equal(voc_palette()[label], colours)
    np.testing.assert_array_equal(sources.read_index_png(path), label)  # indices, not colours
    Image.fromarray(colours).save(tmp_path / "rgb.png")
    with pytest.raises(sources.InvalidExampleError, match="rgb.png.*mode 'RGB'"):
        sources.read_index_png(tmp_path / "rgb.png")


def test_read_image_stores_jpeg_bytes_and_converts_other_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.jpg")
    stored, size = sources.read_image(tmp_path / "a.jpg")
    assert stored == (tmp_path / "a.jpg").read_bytes() and size == (6, 10)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")  # TF cannot decode CMYK
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    for name in ("cmyk.jpg", "rgba.png"):
        stored, size = sources.read_image(tmp_path / name)
        assert size == (6, 10)  # stored losslessly (PNG): what the pipeline decodes is PIL's RGB
        with Image.open(tmp_path / name) as image:
            pil_rgb = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(decode.decode_rgb(tf.constant(stored)).numpy(), pil_rgb)


# Full-annotation ids: unlabelled, accordion (not in the 59), aeroplane (class 0 of 59), person,
# wood (the last of the 59).
CONTEXT_IDS = [0, 1, 2, 284, 458]
CONTEXT_59 = {0: 255, 1: 255, 2: 0, 284: 36, 458: 58}
CONTEXT_60 = {0: 0, 1: 0, 2: 1, 284: 37, 458: 59}


@pytest.mark.parametrize("config, mapping", [("59", CONTEXT_59), ("60", CONTEXT_60)])
def test_pascal_context(tmp_path, config, mapping):
    train, val = ["2008_000002", "2008_000003", "2008_000007"], ["2008_000009", "2008_000010"]
    maps = write_pascal_context(
        tmp_path / "manual", train=train, val=val, full_ids=CONTEXT_IDS, archive=config == "59"
    )
    builder = prepare_dataset(
        f"pascal_context/{config}",
        data_dir=str(tmp_path / "data"),
        manual_dir=str(tmp_path / "manual"),
    )
    for split, ids in (("train", train), ("val", val)):
        exs = examples(builder, split)
        assert sorted(exs) == sorted(ids)
        for example_id, ex in exs.items():
            expected = np.vectorize(mapping.get)(maps[example_id])
            np.testing.assert_array_equal(ex["label"][..., 0], expected)
    assert classes.CONTEXT_59_CLASSES[36] == "person"
    assert classes.CONTEXT_60_CLASSES[59] == "wood"


def test_coco_stuff10k(tmp_path):
    # unlabelled, person, an unused thing id (street sign), toothbrush, banner, wood
    source_ids = [0, 1, 12, 90, 92, 182]
    mapping = {0: 255, 1: 0, 12: 255, 90: 79, 92: 80, 182: 170}
    train = [f"COCO_train2014_{i:012d}" for i in (77, 81, 92)]
    test = ["COCO_train2014_000000000110"]
    maps = write_coco_stuff10k(
        tmp_path / "manual", train=train, test=test, source_ids=source_ids, archive=True
    )
    builder = prepare_dataset(
        "coco_stuff10k", data_dir=str(tmp_path / "data"), manual_dir=str(tmp_path / "manual")
    )
    for split, ids in (("train", train), ("test", test)):
        exs = examples(builder, split)
        assert sorted(exs) == ids
        for example_id, ex in exs.items():
            expected = np.vectorize(mapping.get)(maps[example_id])
            np.testing.assert_array_equal(ex["label"][..., 0], expected)
    assert classes.COCO_STUFF_CLASSES[79] == "toothbrush"
    assert classes.COCO_STUFF_CLASSES[80] == "banner"


def test_class_tables():
    assert len(classes.VOC_CLASSES) == 21
    ids = [i for i, _ in classes.CONTEXT_59]
    assert len(ids) == 59 == len(set(ids)) and ids == sorted(ids)
    assert classes.CONTEXT_59_CLASSES == tuple(sorted(classes.CONTEXT_59_CLASSES))
    assert len(classes.COCO_STUFF_CLASSES) == 171 == len(set(classes.COCO_STUFF_CLASSES))
    unused = [i for i, name in classes.COCO_STUFF_IDS if name is None]
    assert unused == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91]
    lut = classes.coco_stuff_lut()
    assert sorted(v for v in lut if v != 255) == list(range(171))


def _run_tfds_build(args: list[str]) -> subprocess.CompletedProcess:
    """`tfds build ARGS`. TFDS 4.9.10's `tfds` script also imports apache_beam and mlcroissant
    for its other commands (tensorflow/datasets#5463); without them, run the build command's
    own implementation, which is what `tfds build` executes."""
    try:
        import apache_beam  # noqa: F401
        import mlcroissant  # noqa: F401

        command = [str(Path(sys.executable).with_name("tfds")), "build", *args]
    except ImportError:
        runner = (
            "import sys, simple_parsing\n"
            "from tensorflow_datasets.scripts.cli import build\n"
            "simple_parsing.parse(build.Args, args=sys.argv[1:]).execute()\n"
        )
        command = [sys.executable, "-c", runner, *args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_tfds_build_cli(tmp_path):
    write_voc_aug(tmp_path / "manual", archive=True)
    result = _run_tfds_build(
        [
            "hemnet_jax/data/voc2012_aug.py",
            "--manual_dir",
            str(tmp_path / "manual"),
            "--data_dir",
            str(tmp_path / "data"),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import hemnet_jax.data.builders  # noqa: F401

    builder = tfds.builder("voc2012_aug", data_dir=str(tmp_path / "data"))
    assert builder.is_prepared()
    assert builder.info.splits["train_aug"].num_examples == len(TRAIN_AUG)
