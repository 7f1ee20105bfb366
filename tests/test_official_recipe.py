"""The official EMANet code's training and evaluation details (docs/reproducing.md), each against
an independent reference written here from the official code's formulas (XiaLiPKU/EMANet:
train.py, dataset.py, network.py, eval.py), with PyTorch's own ops where it called them.
"""

import io
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
import tensorflow as tf
import torch
import torch.nn.functional as F
from PIL import Image

from hemnet_jax import cli, hem, models
from hemnet_jax import config as cfg
from hemnet_jax.data import augment, decode
from hemnet_jax.data.palette import to_palette_image
from hemnet_jax.data.pipeline import make_eval_dataset
from hemnet_jax.data.prepare import prepare_dataset
from hemnet_jax.evaluation import validation
from hemnet_jax.models import HEMUnit, create_model
from hemnet_jax.models.hemnet import feature_mask
from hemnet_jax.training import losses, optim, sharding, state
from tests.data_fakes import write_sbd, write_voc2012
from tests.tiny import tiny_config

MEAN, STD = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth gradients plus noise (JPEG's DCT rounding shows)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = [128 + 100 * np.sin(xx / 7.0 + c) * np.cos(yy / 5.0) for c in range(3)]
    noisy = np.stack(smooth, -1) + rng.normal(0, 20, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray, **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", **kw)
    return buffer.getvalue()


def _pil_rgb(data: bytes) -> np.ndarray:
    """dataset.py's `fetch`: PIL, converted to RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# 1. Loss normalisation.


def test_all_pixels_loss_is_the_official_nll_mean_over_every_pixel():
    """network.py's CrossEntropyLoss2d: NLLLoss(reduction='none', ignore_index=255) of
    log_softmax, .mean(dim=2).mean(dim=1) per image, then train.py's loss.mean()."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (3, 6, 7, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (3, 6, 7))
    labels[0, :4] = 255  # images with different valid fractions
    labels[1, :, :2] = 255
    nll = torch.nn.NLLLoss(reduction="none", ignore_index=255)(
        F.log_softmax(torch.from_numpy(logits).permute(0, 3, 1, 2).double(), dim=1),
        torch.from_numpy(labels),
    )
    official = nll.mean(dim=2).mean(dim=1).mean().item()
    ours = losses.cross_entropy(
        jnp.asarray(logits), jnp.asarray(labels), normalization="all_pixels"
    )
    np.testing.assert_allclose(ours, official, rtol=1e-6)
    valid = labels != 255
    per_valid = nll.numpy()[valid].sum() / valid.sum()  # today's: over the valid pixels only
    np.testing.assert_allclose(
        losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), per_valid, rtol=1e-6
    )
    assert abs(per_valid - official) > 0.1 * official
    with pytest.raises(ValueError, match="train.loss_normalization"):
        losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), normalization="pixels")


# ---------------------------------------------------------------------------------------------
# 2. Evaluation padding, official: each image to the next size % 8 == 1, batch 1.


@pytest.fixture(scope="module")
def voc_val(tmp_path_factory):
    """A fake VOC + SBD download whose val images are photo-like JPEGs (quality 75, 4:2:0, as
    VOC's) of 375x500 and 30x17, built by the real voc2012_aug builder."""
    root = tmp_path_factory.mktemp("voc")
    manual, data = root / "manual", root / "data"
    val = {"2007_000033": (375, 500), "2007_000042": (30, 17)}
    write_voc2012(manual, train=["2007_000032"], val=list(val), archive=False)
    write_sbd(manual, train=["2008_000002"], val=[], archive=False)
    voc = manual / "VOCdevkit" / "VOC2012"
    images, labels = {}, {}
    for seed, (example_id, (h, w)) in enumerate(val.items()):
        data_bytes = _jpeg(_photo(h, w, seed), quality=75)
        (voc / "JPEGImages" / f"{example_id}.jpg").write_bytes(data_bytes)
        label = np.random.default_rng(seed).integers(0, 21, (h, w))
        label[:10] = 255
        to_palette_image(label).save(voc / "SegmentationClass" / f"{example_id}.png")
        images[example_id], labels[example_id] = data_bytes, label
    prepare_dataset("voc2012_aug", data_dir=str(data), manual_dir=str(manual))
    return str(data), str(manual), images, labels


def _random_variables(model, seed: int) -> dict:
    """Random variables of the model's shapes, without compiling its (large) init: weights
    N(0, 1 / fan_in), BatchNorm statistics mean 0 var 1, unit-norm bases."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name or "scale" in name:
            return np.ones(leaf.shape, np.float32)
        if "mean" in name or ("bias" in name and "bn" in name):
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        value = rng.standard_normal(leaf.shape).astype(np.float32) / np.sqrt(fan_in)
        if "bases" in name:
            value /= np.linalg.norm(value, axis=-1, keepdims=True)
        return value

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _official_pad(n: int, stride: int = 8) -> int:
    """dataset.py's pad_inf."""
    return n + (stride + 1 - n % stride) % stride


def test_official_padding_runs_377x505_and_scores_the_375x500_pixels(voc_val):
    data_dir, manual_dir, images, labels = voc_val
    config = tiny_config("voc2012_aug")
    config.data.data_dir, config.data.manual_dir = data_dir, manual_dir
    config.eval.padding = "official"
    ds, count = make_eval_dataset(
        name="voc2012_aug",
        split="val",
        data_dir=data_dir,
        manual_dir=manual_dir,
        per_process_batch_size=1,
        pad_size=None,
        pad_stride=8,
    )
    batches = list(ds.as_numpy_iterator())
    assert count == len(batches) == 2
    shapes = {b["id"][0].decode(): b["image"].shape[1:3] for b in batches}
    assert shapes == {"2007_000033": (377, 505), "2007_000042": (33, 17)}

    model = create_model(config.model, 21)
    variables = _random_variables(model, seed=0)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"])
    expected = np.zeros((21, 21), np.int64)
    for batch in batches:
        example_id = batch["id"][0].decode()
        h, w = labels[example_id].shape
        # The reference input: PIL's pixels, normalised as dataset.py does, zero-padded.
        rgb = _pil_rgb(images[example_id]) / 255.0
        padded = np.zeros((1, _official_pad(h), _official_pad(w), 3), np.float32)
        padded[0, :h, :w] = (rgb - MEAN) / STD
        np.testing.assert_allclose(batch["image"], padded, atol=1e-5)
        logits = forward(variables, jnp.asarray(padded))
        prediction = np.asarray(jnp.argmax(logits[0, :h, :w], -1))
        valid = labels[example_id] != 255
        np.add.at(expected, (labels[example_id][valid], prediction[valid]), 1)
    mesh = sharding.create_mesh(jax.devices()[:1])
    confusion = validation.validate(config, model, variables, mesh, 21)["confusion"]
    # Exactly the labelled pixels of the unpadded images are scored: per true class, the counts
    # are the labels' (whatever the predictions).
    counts = sum(np.bincount(label[label != 255], minlength=21) for label in labels.values())
    np.testing.assert_array_equal(confusion.sum(axis=1), counts)
    # And the predictions are the network's on the padded image: another compiled program, so
    # a near-tie may flip a pixel or two (float32 rounding).
    assert np.abs(confusion - expected).sum() <= 4


# ---------------------------------------------------------------------------------------------
# 3. The "fixed" padding's mask: padding takes no part in the HEM unit.


@pytest.mark.parametrize(
    "settings",
    [dict(step_size=0.5, temperature=2.0), dict(step_size=1.0, temperature=1.0, l2_normalize=True)],
    ids=["hemnet", "emanet"],
)
def test_masked_hem_on_a_padded_input_equals_hem_on_the_unpadded_input(settings):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 30, 8))
        mu0 = rng.standard_normal((5, 8))
        order = rng.permutation(43)  # padding rows scattered among the real ones
        padded = np.concatenate([x, 3 * rng.standard_normal((2, 13, 8))], 1)[:, order]
        mask = np.broadcast_to((order < 30), (2, 43))
        mu_ref, gamma_ref = hem.unrolled_hem(
            jnp.asarray(x), jnp.asarray(mu0), num_iters=3, **settings
        )
        mu, gamma = hem.unrolled_hem(
            jnp.asarray(padded), jnp.asarray(mu0), num_iters=3, mask=jnp.asarray(mask), **settings
        )
        np.testing.assert_allclose(mu, mu_ref, rtol=1e-12, atol=1e-14)
        gamma = np.asarray(gamma)
        np.testing.assert_allclose(gamma[:, np.argsort(order)[:30]], gamma_ref, rtol=1e-12)
        np.testing.assert_array_equal(gamma[:, order >= 30], 0.0)
        unmasked, _ = hem.unrolled_hem(
            jnp.asarray(padded), jnp.asarray(mu0), num_iters=3, **settings
        )
        assert np.abs(unmasked - mu_ref).max() > 0.1  # the padding does move unmasked bases


def test_masked_unit_equals_the_unit_on_the_unpadded_features():
    """The unit's convs are 1x1: with the mask, a padded canvas gives the unpadded output on the
    real positions, and the bases' moving average leaves out an all-padding example."""
    unit = HEMUnit(num_bases=4, num_iters=2, step_size=0.5)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 5, 6, 8)), jnp.float32)
    canvas = jnp.asarray(rng.standard_normal((3, 7, 9, 8)), jnp.float32).at[:2, :5, :6].set(x)
    mask = np.zeros((3, 7, 9), bool)
    mask[:2, :5, :6] = True  # the third example is all padding
    variables = jax.jit(lambda key: unit.init(key, x, train=False))(jax.random.PRNGKey(0))

    @jax.jit
    def apply(inputs, mask=None):
        evaluated = unit.apply(variables, inputs, train=False, mask=mask)
        _, updated = unit.apply(
            variables, inputs, train=True, mask=mask, mutable=["batch_stats", "bases"]
        )
        return evaluated, updated["bases"]["mu"]

    eval_ref, bases_ref = apply(x)
    eval_out, bases = apply(canvas, jnp.asarray(mask))
    np.testing.assert_allclose(eval_out[:2, :5, :6], eval_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bases, bases_ref, rtol=1e-5, atol=1e-6)


def test_feature_mask_keeps_the_positions_of_the_official_padding():
    for h, w in [(375, 500), (500, 333), (377, 8), (1, 9)]:
        valid = np.zeros((1, 513, 513), bool)
        valid[0, :h, :w] = True
        mask = np.asarray(feature_mask(jnp.asarray(valid), 8))[0]
        assert mask.shape == (65, 65)
        rows, cols = (_official_pad(h) - 1) // 8 + 1, (_official_pad(w) - 1) // 8 + 1
        expected = np.zeros((65, 65), bool)
        expected[:rows, :cols] = True
        np.testing.assert_array_equal(mask, expected, err_msg=f"{h}x{w}")


# ---------------------------------------------------------------------------------------------
# 4. JPEG decoding as PIL.


def test_jpegs_decode_exactly_as_pil():
    for h, w, kw in [(75, 101, dict(quality=75)), (64, 48, dict(quality=95, subsampling=1))]:
        data = _jpeg(_photo(h, w), **kw)
        ours = decode.decode_rgb(tf.constant(data)).numpy()
        np.testing.assert_array_equal(ours, _pil_rgb(data))
        fast = tf.io.decode_image(data, channels=3).numpy()  # TFDS's default decoder
        assert np.abs(fast.astype(int) - _pil_rgb(data)).max() > 0  # the test can tell
    grey = _jpeg(_photo(40, 30)[..., 0], quality=80)
    np.testing.assert_array_equal(decode.decode_rgb(tf.constant(grey)).numpy(), _pil_rgb(grey))
    png = io.BytesIO()
    Image.fromarray(_photo(9, 7)).save(png, format="PNG")
    np.testing.assert_array_equal(
        decode.decode_rgb(tf.constant(png.getvalue())).numpy(), _photo(9, 7)
    )


# ---------------------------------------------------------------------------------------------
# 5. Training-time resize.


@pytest.mark.parametrize("size", [(37, 50), (50, 37), (64, 48)])
def test_training_scale_matches_official_interpolate(size):
    """dataset.py's `scale`: F.interpolate(image, scale_factor=s, bilinear, align_corners=True)
    on the normalised image, F.interpolate(label, scale_factor=s, nearest) -- the latter as
    PyTorch < 1.6 computed it (recompute_scale_factor=True gives that rule in PyTorch 2)."""
    h, w = size
    rng = np.random.default_rng(h)
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    label = rng.integers(0, 21, (h, w, 1)).astype(np.uint8)
    normalised = torch.from_numpy(((image / 255.0 - MEAN) / STD).astype(np.float32))
    for s in augment.DEFAULT_SCALES:
        out_h, out_w = math.floor(h * s), math.floor(w * s)
        ref_image = F.interpolate(
            normalised.permute(2, 0, 1)[None], scale_factor=s, mode="bilinear", align_corners=True
        )[0].permute(1, 2, 0)
        ref_label = F.interpolate(torch.from_numpy(label[..., 0]).float()[None, None],
                                  scale_factor=s, mode="nearest",
                                  recompute_scale_factor=True)[0, 0].long()  # fmt: skip
        # Our whole augmentation with this one scale, a crop of exactly the scaled size, no flip.
        out = augment.train_augment(
            tf.constant(image),
            tf.constant(label),
            tf.constant([1, 2], tf.int64),
            crop_size=(out_h, out_w),
            scales=(s,),
            flip=False,
        )
        assert tuple(ref_image.shape[:2]) == (out_h, out_w)
        np.testing.assert_allclose(out["image"].numpy(), ref_image.numpy(), atol=2e-6, err_msg=s)
        np.testing.assert_array_equal(out["label"].numpy(), ref_label.numpy(), err_msg=str(s))
        # The same rule written out: output o reads input floor(o * in / out) in float32.
        rows = np.minimum(
            np.floor(np.arange(out_h, dtype=np.float32) * np.float32(h / out_h)), h - 1
        )
        cols = np.minimum(
            np.floor(np.arange(out_w, dtype=np.float32) * np.float32(w / out_w)), w - 1
        )
        np.testing.assert_array_equal(
            out["label"].numpy(), label[rows.astype(int)][:, cols.astype(int), 0]
        )


# ---------------------------------------------------------------------------------------------
# 6. The EMA unit's first conv, frozen in EMANet.


def test_emanet_unit_conv_in_is_frozen_and_others_train():
    """train.py's SGD skips parameters without gradient: no update, no weight decay. Here the
    gradients of every parameter, the unit's conv_in included, are nonzero."""
    config = tiny_config()
    cfg.emanet(config.model)
    assert config.model.freeze_unit_conv_in
    model = create_model(config.model, num_classes=5)
    tx, _ = state.optimizer_for(config, model)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(0)

    def draw():
        return treedef.unflatten([rng.standard_normal(a.shape, np.float32) for a in leaves])

    params = draw()
    before = jax.tree.map(np.copy, params)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        updates, opt_state = update(draw(), opt_state, params)
        params = optax.apply_updates(params, updates)
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(
            params["hem"]["conv_in"][name], before["hem"]["conv_in"][name]
        )
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), params, before)
    flat = flax.traverse_util.flatten_dict(changed)
    assert [k for k, v in flat.items() if not v] == [("hem", "conv_in", "bias"),
                                                     ("hem", "conv_in", "kernel")]  # fmt: skip
    config.model.freeze_unit_conv_in = False  # HEMNet's setting: trained like any conv
    assert models.frozen_param_prefixes(config.model) == ()


def test_frozen_unit_conv_bias_has_pytorchs_default_init():
    c = 512
    x = jnp.zeros((1, 2, 2, c))

    def init(unit):
        return jax.jit(lambda key: unit.init(key, x, train=False))(jax.random.PRNGKey(0))

    frozen = init(HEMUnit(num_bases=4, frozen_conv_in=True))
    bias = np.asarray(frozen["params"]["conv_in"]["bias"])
    bound = 1 / math.sqrt(c)
    assert np.abs(bias).max() <= bound
    assert scipy.stats.kstest(bias, "uniform", args=(-bound, 2 * bound)).pvalue > 1e-3
    trained = init(HEMUnit(num_bases=4))
    np.testing.assert_array_equal(trained["params"]["conv_in"]["bias"], 0.0)


# ---------------------------------------------------------------------------------------------
# 7. The poly learning rate, recomputed every 10 iterations.


def _official_learning_rates(base, num_steps, every, power):
    """train.py: iterations 1..ITER_MAX; before each, poly_lr_scheduler sets
    lr = base * (1 - iter / max) ** power when iter % LR_DECAY == 0 (the SGD starts at base)."""
    lr, rates = base, []
    for it in range(1, num_steps + 1):
        if not (it % every or it > num_steps):
            lr = base * (1 - float(it) / num_steps) ** power
        rates.append(lr)
    return np.array(rates)


def test_learning_rate_updates_every_10_iterations_as_official():
    train = cfg.train_config()
    train.update(dict(num_steps=95, learning_rate=0.009, lr_power=0.9, lr_update_every=10))
    schedule = optim.poly_schedule(train)
    ours = np.array([schedule(k) for k in range(95)])
    np.testing.assert_allclose(ours, _official_learning_rates(0.009, 95, 10, 0.9), rtol=1e-5)
    train.lr_update_every = 1  # today's: every step, from the 0-based step
    every = optim.poly_schedule(train)
    np.testing.assert_allclose(
        [every(k) for k in range(95)], 0.009 * (1 - np.arange(95) / 95) ** 0.9, rtol=1e-5
    )


def test_optimizer_matches_official_sgd_groups_and_schedule():
    """train.py's SGD: group '1x' conv weights (weight decay), '1y' BatchNorm weights, '2x' the
    biases of convs *and* BatchNorms at 2x lr; poly_lr_scheduler every LR_DECAY iterations."""
    config = cfg.official_recipe(cfg.base_config())
    train = config.train
    train.update(dict(num_steps=25, learning_rate=0.1, weight_decay=0.01))
    rng = np.random.default_rng(0)
    params = {
        "conv": {"kernel": rng.standard_normal((1, 1, 2, 3)), "bias": rng.standard_normal(3)},
        "bn": {"scale": rng.standard_normal(2), "bias": rng.standard_normal(2)},
    }
    tx, _ = optim.make_optimizer(train, params)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in flax.traverse_util.flatten_dict(
        params, sep="/").items()}  # fmt: skip
    groups = [
        {"params": [t["conv/kernel"]], "lr": 0.1, "weight_decay": 0.01},
        {"params": [t["bn/scale"]], "lr": 0.1, "weight_decay": 0.0},
        {"params": [t["conv/bias"], t["bn/bias"]], "lr": 0.2, "weight_decay": 0.0},
    ]
    opt = torch.optim.SGD(groups, momentum=0.9)
    for it in range(1, 26):
        if not (it % 10 or it > 25):  # poly_lr_scheduler
            new_lr = 0.1 * (1 - float(it) / 25) ** 0.9
            for group, mult in zip(opt.param_groups, (1, 1, 2), strict=True):
                group["lr"] = mult * new_lr
        grads = jax.tree.map(lambda p: rng.standard_normal(p.shape), params)
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        for name, g in flax.traverse_util.flatten_dict(grads, sep="/").items():
            t[name].grad = torch.tensor(g)
        opt.step()
    for name, value in flax.traverse_util.flatten_dict(params, sep="/").items():
        np.testing.assert_allclose(value, t[name].detach().numpy(), rtol=1e-5, err_msg=name)


def test_paper_configs_use_the_official_recipe_and_the_demo_keeps_its_own():
    for name in ("voc", "context", "cocostuff"):
        config = cli.load_config_file(f"configs/{name}.py")
        assert (config.train.loss_normalization, config.train.lr_update_every,
                config.train.norm_bias_lr_mult, config.eval.padding) == (
                "all_pixels", 10, 2.0, "official")  # fmt: skip
        assert not config.model.freeze_unit_conv_in
        assert cli.load_config_file(f"configs/{name}.py:emanet").model.freeze_unit_conv_in
    demo = cli.load_config_file("configs/synthetic.py")
    assert (demo.train.loss_normalization, demo.train.lr_update_every,
            demo.train.norm_bias_lr_mult, demo.eval.padding) == (
            "valid_pixels", 1, 1.0, "fixed")  # fmt: skip
