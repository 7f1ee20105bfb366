"""Prediction pictures and the Fig. 4 attention grid, on a freshly initialised tiny HEMNet."""

import jax
import numpy as np
import pytest
from PIL import Image

from hemnet_jax import config as cfg
from hemnet_jax.data import palette
from hemnet_jax.evaluation import predict, visualize
from hemnet_jax.models import create_model, hemnet
from tests.tiny import tiny_config
from tests.tiny_model import init_variables

NUM_CLASSES = 6


@pytest.fixture(scope="module")
def segmenter():
    config = tiny_config()
    model = create_model(config.model, NUM_CLASSES)
    variables = init_variables(model, seed=0)
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
    config.eval.num_iters = 3
    rgb = np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    pictures = visualize.hem_pictures(model, variables, rgb, config)
    k, c = config.model.num_bases, config.model.head_channels
    # T = 3 on the official grid of 24 x 40 (padded to 25 x 41) at stride 8: 4 x 6.
    assert pictures["gamma"].shape == (3, 4, 6, k)
    assert pictures["x"].shape == (4, 6, c) and pictures["x_tilde"].shape == (3, 4, 6, c)
    assert pictures["prediction"].shape == (24, 40)
    np.testing.assert_allclose(pictures["gamma"].sum(-1), 1.0, atol=1e-5)
    # The last reconstruction is the unit's own X_tilde (sown as "x_tilde"), on the canvas
    # evaluation uses (the image's padding masked), and the prediction is predict.py's.
    batch = predict.canvas_batch(rgb, config)
    valid = hemnet.valid_pixels(batch["height"], batch["width"], batch["image"].shape[1:3])
    _, state = model.apply(variables, batch["image"], train=False, num_iters=3, valid=valid,
                           mutable=["intermediates"])
    np.testing.assert_allclose(pictures["x_tilde"][-1],
                               state["intermediates"]["hem"]["x_tilde"][0][0, :4, :6], atol=1e-5)
    np.testing.assert_array_equal(
        pictures["prediction"],
        predict.make_segmenter(model, variables, config)(rgb))
    selection = visualize.default_bases(pictures["gamma"])
    bases = selection.indices
    assert 1 <= len(bases) <= 3 and pictures["gamma"][-1].sum((0, 1)).argmax() == bases[0]
    if len(bases) > 1:  # the chosen maps are not duplicates of each other
        corr = np.corrcoef(pictures["gamma"][-1].reshape(-1, k).T[bases])
        assert np.all(corr[~np.eye(len(bases), dtype=bool)] <= 0.95)
    path = tmp_path / "fig4.png"
    label = np.zeros((24, 40), np.uint8)
    visualize.save_attention_grid(path, rgb, pictures, bases=bases, channels=[0, 5], label=label)
    grid = Image.open(path)
    assert grid.format == "PNG" and grid.size[0] > 400 and grid.size[1] > 300
    with pytest.raises(visualize.IndexSelectionError, match=f"indices 0..{k - 1}"):
        visualize.attention_grid(rgb, pictures, bases=[k], channels=[0])


def _planted_pictures(num_iters=2, k=6, c=4):
    """Attention where bases 0-3 share one map (the demo's collapse) and 4, 5 differ."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:6, :8]
    logits = np.zeros((num_iters, 6, 8, k))
    logits[..., :4] = 4.0 * (xx < 4)[..., None]
    logits[..., 4], logits[..., 5] = 4.0 * (yy < 2), 4.0 * (yy >= 4)
    gamma = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return {"prediction": rng.integers(0, 6, (48, 64)), "gamma": gamma,
            "x": rng.normal(size=(6, 8, c)), "x_tilde": rng.normal(size=(num_iters, 6, 8, c))}


def test_attention_grid_shows_distinct_bases_with_colour_bars_and_a_title():
    pictures = _planted_pictures()
    rgb = np.zeros((48, 64, 3), np.uint8)
    selection = visualize.default_bases(pictures["gamma"], 4)
    # one of the four copies and the two others, most mass first; fewer than asked
    mass = pictures["gamma"][-1].sum((0, 1))
    assert len(set(selection.indices) & {0, 1, 2, 3}) == 1 and {4, 5} < set(selection.indices)
    assert list(selection.indices) == sorted(selection.indices, key=lambda b: -mass[b])
    assert selection.short and selection.available == 3
    fig = visualize.attention_grid(rgb, pictures, bases=selection.indices, channels=[1, 2],
                                   title="scene.png: HEMNet (eta 0.5), T=2, bases 0, 4, 5")
    titles = [ax.get_title() for ax in fig.axes]
    assert "label" not in titles and "image" in titles and "prediction" in titles
    assert fig.get_suptitle() == "scene.png: HEMNet (eta 0.5), T=2, bases 0, 4, 5"
    # colour bars: one per X channel of the top row, one per row of gamma and of X_tilde maps
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2 + 3 + 2
    ranges = {tuple(t.get_text() for t in bar.get_yticklabels()) for bar in bars}
    top = pictures["gamma"][..., 4].max()
    assert ("0", f"{top:.3g}") in ranges
    low, high = pictures["x_tilde"][..., 2].min(), pictures["x_tilde"][..., 2].max()
    assert (f"{low:.3g}", f"{high:.3g}") in ranges
    with_label = visualize.attention_grid(rgb, pictures, bases=[0], channels=[1],
                                          label=np.zeros((48, 64), np.uint8))
    assert "label" in [ax.get_title() for ax in with_label.axes]
    from matplotlib import pyplot as plt

    plt.close(fig)
    plt.close(with_label)


def test_describe_variant():
    config = tiny_config()
    assert visualize.describe_variant(config.model) == "HEMNet (eta 0.5, dot kernel, K 8)"
    cfg.emanet(config.model)
    assert visualize.describe_variant(config.model) == "EMANet (eta 1, dot kernel, K 8)"
    config.model.stop_em_gradient = False
    assert visualize.describe_variant(config.model) == (
        "HEMNet (eta 1, dot kernel, K 8, L2-normalised bases)")


def test_attention_maps_do_not_depend_on_the_padding():
    """Issue 21, item 5: the same image on two canvas sizes (data.eval_pad_size) gives the same
    Fig. 4 maps: the HEM unit is masked to the image as in evaluation. Sharp attention (a low
    temperature) makes the padding's pull visible: unmasked, the maps move by 0.3 (measured);
    masked, by 0.01: the backbone's view of the canvas's far edge and float rounding, both
    amplified 20 times by the temperature (evaluation's predictions share them)."""
    config = tiny_config()
    config.model.temperature = 0.05
    model = create_model(config.model, NUM_CLASSES)
    variables = init_variables(model, seed=0)
    rgb = np.random.default_rng(2).integers(0, 256, (17, 20, 3), dtype=np.uint8)

    @jax.jit
    def unmasked_gamma(image):
        _, state = model.apply(variables, image, train=False, mutable=["intermediates"])
        return state["intermediates"]["hem"]["gamma"][0]

    maps = {}
    for padding in ("fixed", "unmasked"):
        for pad_size in (96, 192):
            config.data.eval_pad_size = pad_size
            if padding == "fixed":
                maps[padding, pad_size] = visualize.hem_pictures(model, variables, rgb, config)
                continue
            batch = predict.canvas_batch(rgb, config)  # what visualize ran before issue 21
            maps[padding, pad_size] = {"gamma": unmasked_gamma(batch["image"])[:, 0, :3, :4]}
    assert maps["fixed", 96]["gamma"].shape == (2, 3, 4, config.model.num_bases)  # 17x20 -> 25x25
    unmasked = np.abs(maps["unmasked", 96]["gamma"] - maps["unmasked", 192]["gamma"]).max()
    masked = np.abs(maps["fixed", 96]["gamma"] - maps["fixed", 192]["gamma"]).max()
    assert unmasked > 0.1 and masked < 0.1 * unmasked, (masked, unmasked)
    assert maps["fixed", 96]["gamma"].max() > 0.5  # sharp attention: the test can fail
