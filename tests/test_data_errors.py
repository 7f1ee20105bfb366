"""Bad downloads end in errors that name the file (and where to get it), never in skips."""

import re

import numpy as np
import pytest
import scipy.io
from PIL import Image

from hemnet_jax.data import tf_devices
from hemnet_jax.data.palette import to_palette_image
from hemnet_jax.data.prepare import prepare_dataset
from hemnet_jax.data.sources import InvalidExampleError, MissingDataError
from tests.data_fakes import (
    pack,
    truncated_jpeg,
    write_coco_stuff10k,
    write_pascal_context,
    write_sbd,
    write_sbd_mat,
    write_voc2012,
)

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
SBD_URL = "semantic_contours/benchmark.tgz"


def build(name: str, tmp_path, manual=None):
    manual = tmp_path / "manual" if manual is None else manual
    return prepare_dataset(name, data_dir=str(tmp_path / "data"), manual_dir=str(manual))


def voc_and_sbd(tmp_path, archive=False):
    manual = tmp_path / "manual"
    write_voc2012(manual, train=["2007_000032"], val=["2007_000033"], archive=archive)
    write_sbd(manual, train=["2008_000003"], val=["2008_000008"], archive=archive)
    return manual


def test_missing_manual_dir(tmp_path):
    with pytest.raises(MissingDataError) as error:
        build("voc2012_aug", tmp_path, manual=tmp_path / "nowhere")
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message
    assert "VOCtrainval_11-May-2012.tar" in message and VOC_URL in message
    assert "benchmark.tgz" in message and SBD_URL in message


def test_missing_archive_names_it_where_looked_and_source(tmp_path):
    manual = tmp_path / "manual"
    write_voc2012(manual, train=["2007_000032"], val=["2007_000033"], archive=True)
    with pytest.raises(MissingDataError) as error:
        build("voc2012_aug", tmp_path)
    message = str(error.value)
    assert "benchmark.tgz" in message and SBD_URL in message
    assert str(manual / "benchmark.tgz") in message
    assert str(manual / "benchmark_RELEASE" / "dataset" / "cls") in message


def test_wrong_archive_content(tmp_path):
    manual = voc_and_sbd(tmp_path, archive=True)
    (manual / "benchmark.tgz").unlink()
    (manual / "other" / "dataset").mkdir(parents=True)
    (manual / "other" / "dataset" / "README").write_text("not SBD")
    pack(manual, ["other"], "benchmark.tgz")
    with pytest.raises(MissingDataError, match=r"benchmark\.tgz.*contains no"):
        build("voc2012_aug", tmp_path)


def test_missing_split_list(tmp_path):
    manual = voc_and_sbd(tmp_path)
    (manual / "benchmark_RELEASE" / "dataset" / "val.txt").unlink()
    with pytest.raises(MissingDataError, match=re.escape(str(manual / "benchmark_RELEASE"))):
        build("voc2012_aug", tmp_path)


def test_missing_example_file(tmp_path):
    manual = voc_and_sbd(tmp_path)
    missing = manual / "benchmark_RELEASE" / "dataset" / "cls" / "2008_000008.mat"
    missing.unlink()
    with pytest.raises(MissingDataError, match=re.escape(str(missing))):
        build("voc2012_aug", tmp_path)


def test_corrupt_image(tmp_path):
    manual = voc_and_sbd(tmp_path)
    corrupt = manual / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000033.jpg"
    truncated_jpeg(corrupt)
    with pytest.raises(InvalidExampleError, match=re.escape(str(corrupt))):
        build("voc2012_aug", tmp_path)


def test_not_an_image(tmp_path):
    manual = voc_and_sbd(tmp_path)
    corrupt = manual / "benchmark_RELEASE" / "dataset" / "img" / "2008_000003.jpg"
    corrupt.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(InvalidExampleError, match=re.escape(str(corrupt))):
        build("voc2012_aug", tmp_path)


def test_mask_size_differs_from_image(tmp_path):
    manual = voc_and_sbd(tmp_path)
    mask = manual / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000032.png"
    to_palette_image(np.zeros((5, 7), np.uint8)).save(mask)
    with pytest.raises(InvalidExampleError, match=re.escape(str(mask)) + r".*\(5, 7\) differs"):
        build("voc2012_aug", tmp_path)


def test_voc_label_out_of_range(tmp_path):
    manual = voc_and_sbd(tmp_path)
    mask = manual / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000033.png"
    with Image.open(mask) as image:
        label = np.array(image)
    label[3, 3] = 21  # VOC has classes 0..20 and 255
    to_palette_image(label).save(mask)
    with pytest.raises(InvalidExampleError, match=re.escape(str(mask)) + r".*\[21\]"):
        build("voc2012_aug", tmp_path)


def test_sbd_label_out_of_range(tmp_path):
    manual = voc_and_sbd(tmp_path)
    mat = manual / "benchmark_RELEASE" / "dataset" / "cls" / "2008_000003.mat"
    segmentation = scipy.io.loadmat(mat, squeeze_me=True, struct_as_record=False)["GTcls"]
    label = segmentation.Segmentation.copy()
    label[0, 0] = 40
    write_sbd_mat(mat, label)
    with pytest.raises(InvalidExampleError, match=re.escape(str(mat)) + r".*\[40\]"):
        build("voc2012_aug", tmp_path)


def test_sbd_mat_without_segmentation(tmp_path):
    manual = voc_and_sbd(tmp_path)
    mat = manual / "benchmark_RELEASE" / "dataset" / "cls" / "2008_000008.mat"
    scipy.io.savemat(mat, {"GTinst": {"Segmentation": np.zeros((2, 2), np.uint8)}})
    with pytest.raises(InvalidExampleError, match=re.escape(str(mat)) + r".*no GTcls"):
        build("voc2012_aug", tmp_path)


def test_context_id_out_of_range(tmp_path):
    maps = write_pascal_context(
        tmp_path / "manual", train=["a"], val=["b"], full_ids=[0, 2, 460], archive=False
    )
    assert (maps["a"] == 460).any()
    with pytest.raises(InvalidExampleError, match=r"trainval/a\.mat.*\[460\]"):
        build("pascal_context", tmp_path)


def test_coco_stuff_id_out_of_range(tmp_path):
    maps = write_coco_stuff10k(
        tmp_path / "manual", train=["x"], test=["y"], source_ids=[0, 1, 183], archive=False
    )
    assert (maps["x"] == 183).any()
    with pytest.raises(InvalidExampleError, match=r"annotations/x\.mat.*\[183\]"):
        build("coco_stuff10k", tmp_path)


def test_tensorflow_already_on_an_accelerator_is_an_error(monkeypatch):
    def refuse(devices, device_type):
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    tf = tf_devices.tensorflow()
    monkeypatch.setattr(tf.config, "set_visible_devices", refuse)
    monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind: [kind])
    with pytest.raises(RuntimeError, match="JAX needs"):
        tf_devices.hide_accelerators_from_tensorflow()


def test_tensorflow_sees_no_accelerator():
    for kind in ("GPU", "TPU"):
        assert tf_devices.tensorflow().config.get_visible_devices(kind) == []
