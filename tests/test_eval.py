"""Evaluation: MS + flip predictors, eval.py on a checkpoint written by training, T_eval sweeps.

One tiny run is trained per test run (conftest's `tiny_run`, 2 steps); eval.py is run on it as
users run it.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from hemnet_jax import hem_diagnostics, trainer
from hemnet_jax.evaluation import predictors, runner
from hemnet_jax.models import create_model
from hemnet_jax.models.resize import interpolation_matrix
from hemnet_jax.training import checkpointing, diagnostics, sharding
from hemnet_jax.training.state import CheckpointNotFoundError, locate_checkpoint, restore_for_eval
from tests.tiny import TINY_RUN_STEPS, tiny_config
from tests.tiny_model import init_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_STEPS = TINY_RUN_STEPS


def _config(data_dir: str):
    config = tiny_config()
    config.data.data_dir = data_dir
    return config


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory) -> str:
    """A workdir with a checkpoint of step 2, written by the training loop on one device (it is
    evaluated on 8: restoring reshards): this module's copy of conftest's `tiny_run`."""
    workdir = str(tmp_path_factory.mktemp("run") / "run")
    shutil.copytree(tiny_run, workdir)
    return workdir


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}  # conftest's 8 CPU devices are inherited
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


# ---------------------------------------------------------------------------------------------
# The resampling matrices: each example's real region only, align_corners like the model.


def test_resize_matrices_resample_each_real_region():
    out_valid, in_valid = np.array([7, 1, 0, 12]), np.array([5, 3, 0, 9])
    m = np.asarray(predictors.resize_matrices(12, 9, out_valid, in_valid))
    assert m.shape == (4, 12, 9)
    for b, (o, i) in enumerate(zip(out_valid, in_valid, strict=True)):
        expected = np.zeros((12, 9), np.float32)
        if o and i:
            expected[:o, :i] = interpolation_matrix(o, i)
        np.testing.assert_allclose(m[b], expected, atol=1e-6, err_msg=f"example {b}")
    identity = np.asarray(predictors.resize_matrices(6, 6, np.array([6, 4]), np.array([6, 4])))
    np.testing.assert_array_equal(identity[0], np.eye(6))
    np.testing.assert_array_equal(identity[1], np.diag([1, 1, 1, 1, 0, 0]))


def test_flip_matrices_mirror_real_columns_only():
    f = np.asarray(predictors.flip_matrices(5, np.array([3, 5, 0])))
    row = np.arange(5.0)
    np.testing.assert_array_equal(f[0] @ row, [2, 1, 0, 3, 4])  # padding stays at the right
    np.testing.assert_array_equal(f[1] @ row, [4, 3, 2, 1, 0])
    np.testing.assert_array_equal(f[2] @ row, row)
    np.testing.assert_array_equal(f[0] @ f[0], np.eye(5))


# ---------------------------------------------------------------------------------------------
# The flip path on stub models, eagerly (no jit): what the model sees and what comes back.

NUM_CLASSES = 3


class PointwiseStub:
    """logits[b, y, x] = image[b, y, x] @ W: commutes with flips, so MS + flip = SS exactly.
    With `record` (eager calls only), keeps the images it was applied to."""

    def __init__(self, record: bool = False):
        self.seen = [] if record else None
        self.weights = jnp.asarray(np.random.default_rng(0).normal(size=(3, NUM_CLASSES)))

    def apply(self, variables, images, *, train, num_iters=None):
        if self.seen is not None:
            self.seen.append(np.asarray(images))
        return {"logits": images @ self.weights}


class RampStub:
    """logits[..., 0] = x / 4 (the column), other classes 0: ignores the image entirely."""

    def apply(self, variables, images, *, train, num_iters=None):
        b, h, w, _ = images.shape
        ramp = jnp.broadcast_to(jnp.arange(w, dtype=jnp.float32) / 4, (b, h, w))
        return {"logits": jnp.stack([ramp] + [jnp.zeros_like(ramp)] * (NUM_CLASSES - 1), -1)}


def _asymmetric_batch():
    """Two examples on a 6 x 8 canvas: 6 x 8 and 4 x 5 real pixels, left-right asymmetric."""
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 6, 8, 3)).astype(np.float32)
    image[1, 4:], image[1, :, 5:] = 0, 0  # the pipeline's padding
    return {"image": jnp.asarray(image), "height": jnp.array([6, 4]), "width": jnp.array([8, 5])}


def _real(probs, batch, b):
    return np.asarray(probs)[b, : int(batch["height"][b]), : int(batch["width"][b])]


def test_flip_view_sees_the_mirrored_image_padded_at_the_right():
    batch, stub = _asymmetric_batch(), PointwiseStub(record=True)
    predictors.multi_scale_predictor(stub, scales=(1.0,), flip=True)({}, batch)
    plain, flipped = stub.seen
    image = np.asarray(batch["image"])
    assert not np.allclose(image[0], image[0, :, ::-1])  # asymmetric
    np.testing.assert_allclose(plain, image, atol=1e-6)
    expected = image.copy()
    expected[0] = image[0, :, ::-1]
    expected[1, :4, :5] = image[1, :4, :5][:, ::-1]
    np.testing.assert_allclose(flipped, expected, atol=1e-6)


def test_flip_path_unflips_its_prediction():
    batch = _asymmetric_batch()
    single = predictors.single_scale_predictor(PointwiseStub())({}, batch)
    both = predictors.multi_scale_predictor(PointwiseStub(), scales=(1.0,), flip=True)({}, batch)
    for b in range(2):  # a flip-equivariant model: the un-flipped flip view is the plain one
        np.testing.assert_allclose(_real(both, batch, b), _real(single, batch, b), atol=1e-5)
    assert not np.allclose(_real(single, batch, 0), _real(single, batch, 0)[:, ::-1], atol=1e-3)

    # A model that ignores the image: the flip view's columns come back mirrored.
    ramp = predictors.single_scale_predictor(RampStub())({}, batch)
    both = predictors.multi_scale_predictor(RampStub(), scales=(1.0,), flip=True)({}, batch)
    for b in range(2):
        p = _real(ramp, batch, b)
        np.testing.assert_allclose(_real(both, batch, b), (p + p[:, ::-1]) / 2, atol=1e-6)


def test_multi_scale_probabilities_cover_real_pixels_only():
    batch = _asymmetric_batch()
    predict = predictors.multi_scale_predictor(PointwiseStub(), scales=(0.5, 0.75, 1.5), flip=True)
    probs = np.asarray(jax.jit(predict)({}, batch))
    np.testing.assert_allclose(probs[0].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs[1, :4, :5].sum(-1), 1.0, atol=1e-5)
    assert np.all(probs[1, 4:] == 0) and np.all(probs[1, :, 5:] == 0)


# ---------------------------------------------------------------------------------------------
# The tiny HEMNet.


@pytest.fixture(scope="module")
def tiny_model():
    config = tiny_config()
    model = create_model(config.model, num_classes=6)
    variables = init_variables(model, seed=0)
    rng = np.random.default_rng(2)
    image = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    image[1, 24:], image[1, :, 20:] = 0, 0
    batch = {"image": image, "height": np.array([32, 24]), "width": np.array([32, 20])}
    return model, variables, batch


def test_multi_scale_at_scale_one_without_flip_equals_single_scale(tiny_model):
    model, variables, batch = tiny_model
    ss = jax.jit(predictors.single_scale_predictor(model))(variables, batch)
    ms = jax.jit(predictors.multi_scale_predictor(model, scales=(1.0,), flip=False))(
        variables, batch)
    for b in range(2):
        np.testing.assert_allclose(_real(ms, batch, b), _real(ss, batch, b), atol=1e-6)


def test_multi_scale_flip_runs_on_the_tiny_model(tiny_model):
    model, variables, batch = tiny_model
    config = tiny_config()
    config.eval.multi_scale, config.eval.scales, config.eval.flip = True, (0.75,), True
    probs = np.asarray(jax.jit(predictors.make_predictor(model, config.eval, num_iters=3))(
        variables, batch))
    assert probs.shape == (2, 32, 32, 6) and np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs[0].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs[1, :24, :20].sum(-1), 1.0, atol=1e-5)
    assert np.all(probs[1, 24:] == 0)
    ss = jax.jit(predictors.single_scale_predictor(model))(variables, batch)
    assert not np.allclose(probs[0], np.asarray(ss)[0], atol=1e-4)  # the views did something


def _probe_stats(model, variables, images, heights, widths):
    probe = diagnostics.make_probe(model, sharding.create_mesh(jax.devices()[:1]), train=False)
    return diagnostics.add_stats(None, probe(variables, images, heights, widths))


def test_basis_diagnostics_probe_is_masked_like_evaluation(tiny_model):
    """The eval probe runs the model as evaluation does, the HEM unit masked to each image's
    feature positions (`feature_mask`), and counts those positions only: at output stride 8 on
    the 32 x 32 canvas, image 0 has 4 x 4, image 1 (16 x 12, officially padded to 17 x 17)
    3 x 3."""
    model, variables, _ = tiny_model
    images = np.asarray(tiny_model[2]["image"]).copy()
    images[1, 16:], images[1, :, 12:] = 0, 0
    heights, widths = np.array([32, 16]), np.array([32, 12])
    stats = _probe_stats(model, variables, images, heights, widths)
    valid = predictors.valid_mask({"height": heights, "width": widths}, (32, 32))
    _, state = model.apply(variables, images, train=False, valid=valid,
                           mutable=["intermediates"])
    gamma = np.asarray(state["intermediates"]["hem"]["gamma"][0][-1], np.float64)  # [2,4,4,K]
    real = np.concatenate([gamma[0].reshape(-1, gamma.shape[-1]),
                           gamma[1, :3, :3].reshape(-1, gamma.shape[-1])])
    assert stats["pixels"] == 16 + 9
    np.testing.assert_array_equal(stats["mu0"], variables["bases"]["hem"]["mu"])
    np.testing.assert_allclose(stats["mass"], real.sum(0), rtol=1e-5)
    np.testing.assert_allclose(stats["cross"], real.T @ real, rtol=1e-5)
    np.testing.assert_allclose(stats["entropy"], -(real * np.log(real)).sum(), rtol=1e-5)


def test_basis_diagnostics_do_not_depend_on_the_padding():
    """Issue 21, item 5: one 17 x 20 image on a 96 and a 192 canvas gives the same attention
    sums. With sharp attention (temperature 0.05) an unmasked forward pass moves them by over
    10% (the padding pulls the bases); masked, under 1% (the backbone's view of the canvas's
    far edge and float rounding, amplified 20 times by the temperature)."""
    config = tiny_config()
    config.model.temperature = 0.05
    model = create_model(config.model, num_classes=6)
    variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False))(
        jax.random.PRNGKey(0))
    image = np.random.default_rng(2).normal(size=(17, 20, 3)).astype(np.float32)

    @jax.jit
    def unmasked_gamma(canvas):
        _, state = model.apply(variables, canvas, train=False, mutable=["intermediates"])
        return state["intermediates"]["hem"]["gamma"][0][-1]

    masked, unmasked = {}, {}
    for size in (96, 192):
        canvas = np.zeros((1, size, size, 3), np.float32)
        canvas[0, :17, :20] = image
        masked[size] = _probe_stats(model, variables, canvas, np.array([17]), np.array([20]))
        gamma = unmasked_gamma(canvas)
        unmasked[size] = hem_diagnostics.attention_stats(gamma[:, :3, :4])  # the same cells
    assert masked[96]["pixels"] == masked[192]["pixels"] == 12

    def change(stats, key):
        return float(np.abs(stats[96][key] - stats[192][key]).max() / np.abs(stats[96][key]).max())

    for key in ("mass", "cross"):
        assert change(masked, key) < 0.01 and change(unmasked, key) > 0.1, (
            key, change(masked, key), change(unmasked, key))


# ---------------------------------------------------------------------------------------------
# eval.py on a checkpoint written by the training loop.


def _labelled_pixels(config) -> int:
    batches, _ = trainer.eval_batches(config, sharding.create_mesh())
    return int(sum((b["label"] != 255).sum() for b in batches))


def _output_dir(trained: str) -> str:
    """Where eval.py's test writes (--output_dir): outside the run's checkpoints and eval/."""
    return os.path.join(trained, "elsewhere")


def test_eval_py_reads_a_training_checkpoint(trained, tiny_data_dir):
    """And writes its JSON to --output_dir, nothing into the run (issue 15, Found 4)."""
    before = sorted(os.walk(os.path.join(trained, "checkpoints")))
    result = _run("eval.py", "--config", "tests/tiny.py", "--workdir", trained,
                  f"--config.data.data_dir={tiny_data_dir}", f"--output_dir={_output_dir(trained)}",
                  "--config.eval.basis_diagnostics=True")
    assert result.returncode == 0, result.stderr[-3000:]
    for notice in ("oneDNN", "absl::InitializeLog", "cpu_feature_guard"):  # issue 21, item 4
        assert notice not in result.stderr, result.stderr[-3000:]
    assert not os.path.exists(os.path.join(trained, "eval"))
    assert sorted(os.walk(os.path.join(trained, "checkpoints"))) == before
    result_stdout = result.stdout
    title = f"checkpoints/{TRAIN_STEPS} (step {TRAIN_STEPS}), single scale, T_eval=2"
    assert title in result.stdout
    for name in ("background", "striped_disc", "hatched_ring", "mIoU", "pixel acc."):
        assert name in result.stdout, name
    path = os.path.join(_output_dir(trained), "eval", f"step{TRAIN_STEPS}_ss_T2.json")
    with open(path) as f:
        report = json.load(f)
    assert report["step"] == TRAIN_STEPS and report["mode"] == "ss"
    (result,) = report["results"]
    confusion = np.array(result["confusion"])
    # Every labelled pixel of the split scored exactly once, over the 8 devices.
    assert confusion.sum() == result["num_pixels"] == _labelled_pixels(_config(tiny_data_dir))
    tp, union = np.diag(confusion), confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    assert result["miou"] == pytest.approx(np.mean(tp[union > 0] / union[union > 0]))
    assert set(result["per_class_iou"]) == {"background", "striped_disc", "checkered_square",
                                            "dotted_triangle", "solid_cross", "hatched_ring"}
    # Basis diagnostics beside the mIoU: mu0's are the checkpoint's bases'.
    values = result["diagnostics"]
    restored = restore_for_eval(_config(tiny_data_dir), workdir=trained)
    mu0 = np.asarray(restored.variables["bases"]["hem"]["mu"])
    assert values["bases/distinct_bases"] == hem_diagnostics.distinct_bases(mu0).max() + 1
    assert values["bases/norm_mean"] == pytest.approx(np.linalg.norm(mu0, axis=-1).mean())
    assert 1 <= values["bases/effective_distinguishing"] <= values["bases/num_bases"] == 8
    line = f"T_eval=2: {diagnostics.describe(values)}"
    assert line in result_stdout and "distinct of 8" in line and "distinguishing" in line


def test_sweep_restores_once_and_matches_single_scale(trained, tiny_data_dir, capsys):
    """A T_eval sweep with the MS predictor at scale 1.0 without flip: its T = 2 entry is the
    single-scale result of eval.py (run by the previous test, or here)."""
    config = _config(tiny_data_dir)
    ss_path = os.path.join(_output_dir(trained), "eval", f"step{TRAIN_STEPS}_ss_T2.json")
    if not os.path.exists(ss_path):
        runner.evaluate(config, workdir=trained, output_dir=_output_dir(trained))
    with open(ss_path) as f:
        ss = json.load(f)["results"][0]
    config.eval.update(num_iters_sweep="1,2", multi_scale=True, scales=(1.0,), flip=False)
    report = runner.evaluate(config, workdir=trained)
    assert [r["num_iters"] for r in report["results"]] == [1, 2]
    assert all("diagnostics" not in r for r in report["results"])  # eval.basis_diagnostics off
    assert report["json"].endswith(f"step{TRAIN_STEPS}_ms1_T1-2.json")
    assert os.path.exists(report["json"])
    out = capsys.readouterr().out
    assert "mIoU by T_eval" in out and "(* = T_train = 2)" in out
    ms = report["results"][1]
    assert ms["num_pixels"] == ss["num_pixels"]
    # The same predictions up to float rounding at near-ties of an untrained model.
    difference = np.abs(np.array(ms["confusion"]) - np.array(ss["confusion"])).sum()
    assert difference <= 0.001 * ss["num_pixels"], difference
    assert ms["miou"] == pytest.approx(ss["miou"], abs=1e-3)


def test_checkpoint_of_another_model_config_is_named(trained, tiny_data_dir):
    config = _config(tiny_data_dir)
    config.model.num_bases = 4
    mismatch = "model.num_bases: checkpoint 8, config 4"
    with pytest.raises(checkpointing.CheckpointMismatchError, match=mismatch):
        restore_for_eval(config, workdir=trained)
    # The command line, with --checkpoint naming the step directory: one clear line.
    step_dir = os.path.join(trained, "checkpoints", str(TRAIN_STEPS))
    result = _run("eval.py", "--config", "tests/tiny.py", "--checkpoint", step_dir,
                  f"--config.data.data_dir={tiny_data_dir}", "--config.model.head_channels=8")
    assert result.returncode == 1
    assert "FATAL: The checkpoint" in result.stderr
    assert "model.head_channels: checkpoint 16, config 8" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_checkpoint_says_what_to_pass(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="train first"):
        locate_checkpoint(workdir=str(tmp_path))
    with pytest.raises(CheckpointNotFoundError, match="step directory"):
        locate_checkpoint(checkpoint=str(tmp_path))
    step_dir = tmp_path / "checkpoints" / "30"
    step_dir.mkdir(parents=True)
    directory = str(tmp_path / "checkpoints")
    assert locate_checkpoint(checkpoint=f"{step_dir}/") == (directory, 30)
    assert locate_checkpoint(checkpoint=directory) == (directory, None)
    assert locate_checkpoint(workdir=str(tmp_path)) == (directory, None)


def test_parse_sweep():
    assert runner.parse_sweep("1, 2,4,") == [1, 2, 4]
    assert runner.parse_sweep("") == []
    with pytest.raises(ValueError, match="'0' is not a positive integer"):
        runner.parse_sweep("1,0")


def test_predict_cli_on_the_training_checkpoint(trained, tmp_path):
    """`python -m hemnet_jax.evaluation.predict` restores the checkpoint and writes palette masks
    (its errors: tests/test_predict.py)."""
    images = tmp_path / "images"
    images.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (24, 37, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(images / "photo.png")
    out = tmp_path / "out"
    result = _run("-m", "hemnet_jax.evaluation.predict", "--config", "tests/tiny.py",
                  "--workdir", trained, "--images", str(images), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    mask = Image.open(out / "photo.png")
    assert mask.mode == "P" and mask.size == (37, 24)
    assert Image.open(out / "photo_overlay.png").size == (37, 24)
    assert "Wrote 1 masks and overlays" in result.stdout


def test_result_file_names_encode_every_setting_that_changes_the_numbers():
    """Found 8: results of different scales, flips, T_eval, sweeps or partial splits never
    share a file."""
    settings = [
        ({}, [3], False), ({"multi_scale": True}, [3], False),
        ({"multi_scale": True, "flip": False}, [3], False),
        ({"multi_scale": True, "scales": (0.75, 1.0, 1.25)}, [3], False),
        ({"multi_scale": True, "scales": (0.75, 1.0, 1.25), "flip": False}, [3], False),
        ({}, [4], False), ({}, [1, 2], True), ({}, [1, 2, 3], True),
        ({"max_batches": 2}, [3], False), ({"padding": "official"}, [3], False),
    ]
    names = []
    for update, iters, sweep in settings:
        config = tiny_config().eval
        config.update(update)
        names.append(runner.result_file_name(3000, config, iters, sweep))
    assert len(set(names)) == len(names), names
    assert names[0] == "step3000_ss_T3.json"
    assert names[3] == "step3000_ms0.75-1-1.25_flip_T3.json"
    assert names[6] == "step3000_ss_T1-2.json"


def test_visualize_cli_on_the_training_checkpoint(trained, tmp_path):
    """`python -m hemnet_jax.evaluation.visualize` restores the checkpoint and writes the Fig. 4
    grid (its choice of bases and its layout: tests/test_predict.py)."""
    rgb = np.random.default_rng(1).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "scene.png")
    out = tmp_path / "fig4.png"
    result = _run("-m", "hemnet_jax.evaluation.visualize", "--config", "tests/tiny.py",
                  "--workdir", trained, "--image", str(tmp_path / "scene.png"),
                  "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(out).format == "PNG" and f"Wrote {out}" in result.stdout
    assert "Traceback" not in result.stderr
