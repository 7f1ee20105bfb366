"""Prediction pictures and the Fig. 4 attention grid, on a freshly initialised tiny HEMNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from hemnet_jax.data import palette
from hemnet_jax.evaluation import predict, visualize
from hemnet_jax.models import create_model
from tests.tiny import tiny_config

NUM_CLASSES = 6


@pytest.fixture(scope="module")
def segmenter():
    config = tiny_config()
    model = create_model(config.model, NUM_CLASSES)
    variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False))(
        jax.random.PRNGKey(0))
    return model, variables, predict.make_segmenter(model, variables, config)


def _write_images(folder, sizes=((30, 41), (32, 20))):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    images = {}
    for i, (h, w) in enumerate(sizes):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        name = f"img{i}.jpg" if i % 2 == 0 else f"img{i}.png"
        Image.fromarray(rgb).save(folder / name)
        images[f"img{i}"] = np.asarray(Image.open(folder / name).convert("RGB"))
    return images


def test_masks_are_palette_pngs_of_the_input_size(segmenter, tmp_path):
    _, _, segment = segmenter
    # 30 x 41 is larger than the 32 x 32 canvas in width: predicted on a 32 x 64 canvas.
    images = _write_images(tmp_path / "in")
    written = predict.predict_folder(segment, tmp_path / "in", tmp_path / "out")
    assert [m.name for m, _ in written] == ["img0.png", "img1.png"]
    for mask_path, overlay_path in written:
        rgb = images[mask_path.stem]
        mask = Image.open(mask_path)
        assert mask.mode == "P" and mask.size == (rgb.shape[1], rgb.shape[0])
        colours = np.array(mask.getpalette()[: 3 * 256], np.uint8).reshape(256, 3)
        np.testing.assert_array_equal(colours, palette.voc_palette())
        labels = np.asarray(mask)
        np.testing.assert_array_equal(labels, segment(rgb))
        assert labels.max() < NUM_CLASSES
        blend = np.asarray(Image.open(overlay_path))
        assert blend.shape == rgb.shape
        np.testing.assert_array_equal(blend, predict.overlay(rgb, labels))
        assert not np.array_equal(blend, rgb)


def test_overlay_blends_class_colours():
    rgb = np.full((2, 3, 3), 100, np.uint8)
    labels = np.array([[0, 1, 2], [15, 0, 255]])
    out = predict.overlay(rgb, labels, alpha=0.5)
    np.testing.assert_array_equal(out[0, 1], [114, 50, 50])  # class 1 = (128, 0, 0)
    np.testing.assert_array_equal(out[0, 0], [50, 50, 50])  # background black


def test_predict_errors_name_the_problem(segmenter, tmp_path):
    _, _, segment = segmenter
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict.predict_folder(segment, tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(predict.ImageFolderError, match="No images"):
        predict.predict_folder(segment, tmp_path / "empty", tmp_path / "out")
    folder = tmp_path / "bad"
    _write_images(folder, sizes=((8, 8),))
    (folder / "zz_broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(predict.ImageReadError, match="zz_broken.jpg"):
        predict.predict_folder(segment, folder, tmp_path / "out")
    truncated = Image.new("RGB", (64, 64), "red")
    truncated.save(folder / "zz_broken.jpg")
    data = (folder / "zz_broken.jpg").read_bytes()
    (folder / "zz_broken.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(predict.ImageReadError, match="zz_broken.jpg"):
        predict.predict_folder(segment, folder, tmp_path / "out")
    Image.new("RGB", (4, 4)).save(folder / "img0.png")  # img0.jpg is there too
    with pytest.raises(predict.ImageFolderError, match="img0.jpg and img0.png"):
        predict.list_images(folder)


def test_canvas_size():
    assert predict.canvas_size(30, 20, 32) == (32, 32)
    assert predict.canvas_size(33, 100, (40, 64)) == (40, 128)


def test_attention_grid_from_the_intermediates(segmenter, tmp_path):
    model, variables, _ = segmenter
    config = tiny_config()
    rgb = np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    pictures = visualize.hem_pictures(model, variables, rgb, num_iters=3)
    k, c = config.model.num_bases, config.model.head_channels
    assert pictures["gamma"].shape == (3, 3, 5, k)  # T = 3 at 1/8 of 24 x 40
    assert pictures["x"].shape == (3, 5, c) and pictures["x_tilde"].shape == (3, 3, 5, c)
    assert pictures["prediction"].shape == (24, 40)
    np.testing.assert_allclose(pictures["gamma"].sum(-1), 1.0, atol=1e-5)
    # The last reconstruction is the unit's own X_tilde (sown as "x_tilde").
    _, state = model.apply(variables, predict.normalize(rgb)[None], train=False, num_iters=3,
                           mutable=["intermediates"])
    np.testing.assert_allclose(pictures["x_tilde"][-1],
                               state["intermediates"]["hem"]["x_tilde"][0][0], atol=1e-5)
    bases = visualize.default_bases(pictures["gamma"])
    assert len(bases) == 3 and pictures["gamma"][-1].sum((0, 1)).argmax() == bases[0]
    path = tmp_path / "fig4.png"
    label = np.zeros((24, 40), np.uint8)
    visualize.save_attention_grid(path, rgb, pictures, bases=bases, channels=[0, 5], label=label)
    grid = Image.open(path)
    assert grid.format == "PNG" and grid.size[0] > 400 and grid.size[1] > 300
    with pytest.raises(visualize.IndexSelectionError, match=f"indices 0..{k - 1}"):
        visualize.attention_grid(rgb, pictures, bases=[k], channels=[0])
