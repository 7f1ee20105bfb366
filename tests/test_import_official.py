"""Import of official EMANet checkpoints (and PyTorch HEMNets in their layout): the real CLI
writes a training checkpoint; restored as eval.py restores it, the model computes the PyTorch
model's logits. The PyTorch networks are tests/official_layout.py (written from the paper and
the official code's structure and names, not copied)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hemnet_jax import config as cfg
from hemnet_jax.data import datasets
from hemnet_jax.models import create_model, official
from hemnet_jax.models.resnet import STAGE_SIZES
from hemnet_jax.training import sharding
from hemnet_jax.training.import_official import import_official
from hemnet_jax.training.state import restore_for_eval
from tests import official_layout
from tests.test_train import _subprocess_env
from tests.tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 6  # synthetic_scenes/tiny


def _config(**model):
    config = tiny_config()
    for key, value in model.items():
        config.model[key] = value
    return config


def _emanet_overrides() -> dict:
    """The model keys the `emanet` variant (configs/voc.py:emanet) changes, for the tiny model."""
    plain = tiny_config().model
    emanet = cfg.emanet(tiny_config().model)
    return {k: emanet[k] for k in plain if emanet[k] != plain[k]}


def _torch_net(config, seed=0, **changes):
    """The official-layout PyTorch twin of `config`'s model, random weights, eval mode."""
    m = config.model
    arch = dict(
        classes=datasets.get_dataset_info(config.data.name).num_classes, w=m.base_width,
        stages=STAGE_SIZES[m.backbone], output_stride=m.output_stride, head=m.head_channels,
        mid=m.head_mid_channels, k=m.num_bases, iters=m.num_iters, eta=m.step_size,
        temperature=m.temperature or float(np.sqrt(m.head_channels)), l2=m.l2_normalize,
    )
    return official_layout.randomize(official_layout.OfficialNet(**{**arch, **changes}), seed)


def _import_cli(path, workdir, *overrides):
    cmd = [sys.executable, "-m", "hemnet_jax.models.weights", "import-emanet", str(path),
           "--config", "tests/tiny.py", "--workdir", str(workdir), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=_subprocess_env(1), capture_output=True, text=True,
                          timeout=300)


def _assert_same_logits(config, workdir, net, images):
    restored = restore_for_eval(config, workdir=str(workdir), mesh=_one_device())
    got = restored.model.apply(restored.variables, jnp.asarray(images), train=False)["logits"]
    with torch.no_grad():
        want = net(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape
    scale = np.abs(want).max()
    assert scale > 1e-2 and np.std(want) > 1e-3 * scale  # not a constant map
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * scale)
    return restored


def _images(seed=1):
    return np.random.default_rng(seed).normal(size=(1, 37, 45, 3)).astype(np.float32)


def _one_device():
    return sharding.create_mesh(jax.devices()[:1])


@pytest.mark.heavy(seconds=20)
def test_official_emanet_checkpoint_through_the_cli(tmp_path):
    """{'net': state_dict, 'step': N} as EMANet's train.py saves it, EMANet's math, OS 8."""
    emanet = _emanet_overrides()
    assert emanet["step_size"] == 1.0 and emanet["l2_normalize"]
    config = _config(**emanet)
    net = _torch_net(config)
    path = tmp_path / "step_1234.pth"
    torch.save({"net": net.state_dict(), "step": 1234}, path)
    overrides = [f"--config.model.{k}={v}" for k, v in emanet.items()]

    done = _import_cli(path, tmp_path / "run", *overrides)

    assert done.returncode == 0, done.stderr
    restored = _assert_same_logits(config, tmp_path / "run", net, _images())
    assert restored.step == 1234
    assert restored.path == str(tmp_path / "run" / "checkpoints" / "1234")


def test_hemnet_state_dict_with_dataparallel_prefix(tmp_path):
    """A bare state dict of a PyTorch HEMNet in the official layout (eta 0.5, sigma^2 =
    sqrt(C), no L2 normalisation), keys prefixed by DataParallel's "module.", OS 16."""
    config = _config(output_stride=16, step_size=0.5)
    net = _torch_net(config, seed=3)
    path = tmp_path / "hemnet.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)

    where = import_official(
        config, str(path), str(tmp_path / "run"), mesh=_one_device()
    )

    assert where == str(tmp_path / "run" / "checkpoints" / "0")
    _assert_same_logits(config, tmp_path / "run", net, _images(2))
    with pytest.raises(FileExistsError, match="holds checkpoints already"):
        import_official(config, str(path), str(tmp_path / "run"))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"stages": (1, 1, 3, 3)},
         ["the model has no extractor.6.2.* (1 block)",
          "model.backbone 'blocks per stage (1, 1, 3, 3)' (config: 'resnet_tiny')"]),
        ({"classes": 7},
         ["fc2.weight: file (7, 16, 1, 1), model (6, 16, 1, 1)", "fc2.bias: file (7,)",
          "classes (of data.name) 7 (config: 6)"]),
        ({"head": 8},
         ["fc0.conv.weight: file (8, 128, 3, 3), model (16, 128, 3, 3)",
          "emau.mu: file (1, 8, 8), model (1, 16, 8)", "fc1.0.conv.weight: file (16, 8, 3, 3)",
          "model.head_channels 8 (config: 16)"]),
    ],
    ids=["depth", "classes", "head_width"],
)
def test_other_architectures_are_named(changes, named):
    config = _config()
    model = create_model(config.model, NUM_CLASSES)
    target = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3)), train=False)
    )
    state_dict = {k: v.numpy() for k, v in _torch_net(config, **changes).state_dict().items()}

    with pytest.raises(official.MismatchError) as info:
        official.convert(state_dict, target, stem="deep", source="f.pth")

    message = str(info.value)
    assert "\n" not in message and message.startswith("f.pth does not fit")
    for text in named:
        assert text in message


def test_cli_mismatch_is_one_fatal_line(tmp_path):
    config = _config()
    path = tmp_path / "other.pth"
    torch.save({"net": _torch_net(config, classes=7).state_dict(), "step": 5}, path)

    done = _import_cli(path, tmp_path / "run")

    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    fatal = [line for line in lines if line.startswith("FATAL:")]
    assert len(fatal) == 1 and "Traceback" not in done.stderr
    assert "fc2.weight: file (7, 16, 1, 1), model (6, 16, 1, 1)" in fatal[0]
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize(("backbone", "output_stride"), [("resnet50", 16), ("resnet101", 8)])
def test_full_size_key_sets_match(backbone, output_stride):
    """Every key and shape of the official EMANet at full size (PyTorch meta tensors: no memory)
    equals what the configured model maps to, for VOC's configs."""
    config = cfg.base_config()
    config.model.backbone, config.model.output_stride = backbone, output_stride
    model = create_model(config.model, 21)
    target = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    with torch.device("meta"):
        net = official_layout.OfficialNet(
            classes=21, w=64, stages=STAGE_SIZES[backbone], output_stride=output_stride,
            head=512, mid=256, k=64, iters=3, eta=1.0, temperature=1.0, l2=True,
        )
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()
            if not k.endswith("num_batches_tracked")}
    assert official.shapes_of(target, "deep") == want
