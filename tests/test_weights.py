"""ImageNet weight import: parity with a PyTorch forward, file formats, error listing."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F

from hemnet_jax.config import model_config
from hemnet_jax.models import create_model, weights
from hemnet_jax.models.resnet import STAGE_SIZES, ResNet

STAGES = STAGE_SIZES["resnet_tiny"]
WIDTH = 8


def random_state_dict(stem, seed=0, stages=STAGES, width=WIDTH):
    """A torchvision-layout ResNet state dict (fc included) with random weights and BN stats."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, cout, cin, k):
        std = math.sqrt(2.0 / (k * k * cin))
        sd[f"{name}.weight"] = rng.normal(0, std, (cout, cin, k, k)).astype(np.float32)

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(100, np.int64)

    if stem == "deep":
        conv("conv1.0", width, 3, 3), bn("conv1.1", width)
        conv("conv1.3", width, width, 3), bn("conv1.4", width)
        conv("conv1.6", 2 * width, width, 3), bn("bn1", 2 * width)
        cin = 2 * width
    else:
        conv("conv1", width, 3, 7), bn("bn1", width)
        cin = width
    for s, blocks in enumerate(stages):
        planes = width * 2**s
        for b in range(blocks):
            p = f"layer{s + 1}.{b}"
            conv(f"{p}.conv1", planes, cin, 1), bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", 4 * planes, planes, 1), bn(f"{p}.bn3", 4 * planes)
            if b == 0:
                conv(f"{p}.downsample.0", 4 * planes, cin, 1), bn(f"{p}.downsample.1", 4 * planes)
            cin = 4 * planes
    sd["fc.weight"] = rng.normal(0, 0.01, (1000, cin)).astype(np.float32)
    sd["fc.bias"] = np.zeros(1000, np.float32)
    return sd


def torch_backbone(sd, x, stem, output_stride, stages=STAGES, grids=(1, 2, 4)):
    """EMANet's ResNet forward (eval mode) in functional PyTorch; x: [B, 3, H, W]."""
    t = {k: torch.from_numpy(v) for k, v in sd.items()}

    def conv(x, name, stride=1, padding=0, dilation=1):
        return F.conv2d(x, t[f"{name}.weight"], None, stride, padding, dilation)

    def bn(x, name):
        return F.batch_norm(
            x, t[f"{name}.running_mean"], t[f"{name}.running_var"], t[f"{name}.weight"],
            t[f"{name}.bias"], training=False, eps=1e-5,
        )

    if stem == "deep":
        x = F.relu(bn(conv(x, "conv1.0", 2, 1), "conv1.1"))
        x = F.relu(bn(conv(x, "conv1.3", 1, 1), "conv1.4"))
        x = conv(x, "conv1.6", 1, 1)
    else:
        x = conv(x, "conv1", 2, 3)
    x = F.max_pool2d(F.relu(bn(x, "bn1")), 3, 2, 1)
    if output_stride == 16:
        layers = [(1, 1, None), (2, 1, None), (2, 1, None), (1, 2, grids)]
    else:
        layers = [(1, 1, None), (2, 1, None), (1, 2, None), (1, 4, grids)]
    outs = []
    for s, (blocks, (stride, dilation, g)) in enumerate(zip(stages, layers, strict=True)):
        g = g or [1] * blocks
        for b in range(blocks):
            st, d = (stride, 1 if dilation in (1, 2) else 2) if b == 0 else (1, dilation * g[b])
            p = f"layer{s + 1}.{b}"
            y = F.relu(bn(conv(x, f"{p}.conv1"), f"{p}.bn1"))
            y = F.relu(bn(conv(y, f"{p}.conv2", st, d, d), f"{p}.bn2"))
            y = bn(conv(y, f"{p}.conv3"), f"{p}.bn3")
            if b == 0:
                x = bn(conv(x, f"{p}.downsample.0", st), f"{p}.downsample.1")
            x = F.relu(y + x)
        outs.append(x)
    return outs[2], outs[3]


def abstract_backbone_variables(model, size=33):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


@pytest.mark.parametrize("stem", ["deep", "torchvision"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_converted_weights_compute_what_pytorch_computes(stem, output_stride):
    sd = random_state_dict(stem)
    model = ResNet(STAGES, stem=stem, base_width=WIDTH, output_stride=output_stride)
    variables = weights.convert_resnet(sd, abstract_backbone_variables(model), stem=stem)
    images = np.random.default_rng(1).normal(size=(2, 37, 37, 3)).astype(np.float32)  # odd size

    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    with torch.no_grad():
        ref = torch_backbone(sd, torch.from_numpy(images).permute(0, 3, 1, 2), stem, output_stride)
    for got, want in zip((out["stage3"], out["stage4"]), ref, strict=True):
        want = want.permute(0, 2, 3, 1).numpy()
        assert got.shape == want.shape
        rel = float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))
        assert rel < 1e-4, rel


@pytest.fixture(scope="module")
def tiny_hemnet_variables():
    """Concrete (zero) variables of a tiny HEMNet with a deep stem; values are irrelevant here."""
    m = model_config()
    m.update(backbone="resnet_tiny", base_width=WIDTH, head_channels=16, num_bases=4)
    model = create_model(m, 21)
    abstract = abstract_backbone_variables(model)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)


def save(sd, path):
    if path.suffix == ".safetensors":
        safetensors.numpy.save_file(sd, str(path))
    else:
        torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_pretrained_replaces_only_the_backbone(tiny_hemnet_variables, tmp_path, suffix):
    sd = random_state_dict("deep")
    path = tmp_path / f"resnet{suffix}"
    save(sd, path)
    variables = tiny_hemnet_variables
    loaded = weights.load_pretrained(variables, str(path), stem="deep")

    backbone = loaded["params"]["backbone"]
    np.testing.assert_array_equal(
        backbone["stem_conv1"]["kernel"], sd["conv1.0.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(backbone["stem_bn3"]["scale"], sd["bn1.weight"])
    np.testing.assert_array_equal(
        loaded["batch_stats"]["backbone"]["layer3_0"]["downsample_bn"]["var"],
        sd["layer3.0.downsample.1.running_var"],
    )
    assert jax.tree.map(jnp.shape, loaded) == jax.tree.map(jnp.shape, variables)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(loaded))
    for collection in ("params", "batch_stats"):
        for name, tree in variables[collection].items():
            if name != "backbone":
                assert loaded[collection][name] is tree  # the head is untouched
    assert loaded["bases"] is variables["bases"]


def test_mismatches_are_listed_in_one_error(tiny_hemnet_variables, tmp_path):
    sd = random_state_dict("deep")
    del sd["layer2.0.bn2.running_var"]
    del sd["conv1.3.weight"]
    sd["layer9.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    sd["layer4.2.conv2.weight"] = np.zeros((64, 32, 3, 3), np.float32)  # model: (64, 64, 3, 3)
    path = tmp_path / "broken.safetensors"
    save(sd, path)
    with pytest.raises(weights.CheckpointMismatchError) as info:
        weights.load_pretrained(tiny_hemnet_variables, str(path), stem="deep")
    message = str(info.value)
    assert str(path) in message
    assert "2 missing keys" in message
    assert "layer2.0.bn2.running_var" in message and "conv1.3.weight" in message
    assert "1 unexpected keys" in message and "layer9.0.conv1.weight" in message
    assert "1 shape mismatches" in message
    assert "layer4.2.conv2.weight: file (64, 32, 3, 3), model (64, 64, 3, 3)" in message
    assert "fc.weight" not in message and "num_batches_tracked" not in message


def test_wrong_stem_is_named(tiny_hemnet_variables, tmp_path):
    path = tmp_path / "resnet.safetensors"
    save(random_state_dict("torchvision"), path)
    with pytest.raises(weights.CheckpointMismatchError, match="set model.stem='torchvision'"):
        weights.load_pretrained(tiny_hemnet_variables, str(path), stem="deep")


def test_pth_without_torch_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    (tmp_path / "resnet.pth").write_bytes(b"a .pth file")
    with pytest.raises(ImportError, match="needs PyTorch.*safetensors"):
        weights.read_state_dict(str(tmp_path / "resnet.pth"))


def test_pth_wrapped_and_prefixed_checkpoint(tmp_path):
    sd = random_state_dict("torchvision")
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}}, path)
    read = weights.read_state_dict(str(path))
    assert read.keys() == sd.keys()
    np.testing.assert_array_equal(read["layer1.0.conv2.weight"], sd["layer1.0.conv2.weight"])


def test_cli_converts_pth_to_safetensors(tmp_path):
    sd = random_state_dict("deep")
    save(sd, tmp_path / "in.pth")
    weights.main(["weights", str(tmp_path / "in.pth"), str(tmp_path / "out.safetensors")])
    out = safetensors.numpy.load_file(str(tmp_path / "out.safetensors"))
    assert out.keys() == sd.keys()
    np.testing.assert_array_equal(out["bn1.running_mean"], sd["bn1.running_mean"])
