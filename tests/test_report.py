"""The cost report: XLA's FLOP convention, dense conv counting, the table, the command line."""

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from hemnet_jax.config import model_config
from hemnet_jax.models import report

REPO = Path(__file__).resolve().parents[1]


def test_xla_counts_two_flops_per_multiply_add():
    assert report.flops_per_multiply_add() == 2.0


def test_dense_conv_macs_count_padding_xla_does_not():
    conv = nn.Conv(4, (3, 3), padding=((4, 4), (4, 4)), kernel_dilation=4, use_bias=False)
    x = jax.ShapeDtypeStruct((1, 16, 16, 8), jnp.float32)
    variables = jax.eval_shape(conv.init, jax.random.key(0), x)
    cost = report.measure(conv.apply, variables, x)
    assert cost.conv_macs == 16 * 16 * 3 * 3 * 8 * 4
    # Taps inside the input per axis: 16 * 3 - 2 * 4 of 48.
    assert cost.flops == pytest.approx(2 * cost.conv_macs * (40 / 48) ** 2)
    assert cost.peak_bytes >= 4 * (16 * 16 * 8 + 3 * 3 * 8 * 4 + 16 * 16 * 4)


@pytest.fixture(scope="module")
def tiny_config():
    m = model_config()
    m.update(backbone="resnet_tiny", base_width=8, head_channels=16, head_mid_channels=8)
    return m


def test_report_of_a_tiny_model(tiny_config):
    r = report.model_report(tiny_config, num_classes=21, image_size=65)
    # Head by hand: 3x3 256 -> 16 + BN, HEM unit (two 1x1, one BN), 3x3 16 -> 8 + BN, 1x1 -> 21.
    assert r.head_params == (9 * 256 * 16 + 32) + (16 * 16 + 16 + 16 * 16 + 32) + (
        9 * 16 * 8 + 16
    ) + (8 * 21 + 21)
    assert r.aux_params == 0
    # The head's convs at 65 / 8 -> 9x9, dense: 256 -> 16 (3x3), 16 -> 16 twice, 16 -> 8, 8 -> 21.
    head_macs = 81 * (9 * 256 * 16 + 2 * 16 * 16 + 9 * 16 * 8 + 8 * 21)
    assert r.full.conv_macs - r.backbone.conv_macs == head_macs
    assert r.full.flops > r.backbone.flops > 0
    assert r.full.peak_bytes > 0 and r.backbone.peak_bytes > 0

    table = report.format_report(r, tiny_config)
    lines = table.splitlines()
    (backbone_row,) = [line for line in lines if line.startswith("resnet_tiny (deep stem, OS 8)")]
    (head_row,) = [line for line in lines if line.startswith("head C=16 (K=64, T=3)")]
    assert f"{r.backbone_params / 1e6:.2f} M" in backbone_row and "370 GFLOPs" in backbone_row
    assert f"+{r.head_params / 1e6:.2f} M" in head_row
    assert any(line.startswith("total") for line in lines)
    assert "multiply-add as 2 FLOPs" in table
    assert "Table 3 is ResNet-101, OS 8, 513x513; this setting differs" in table


def test_command_line(tmp_path):
    cmd = [
        sys.executable, "-m", "hemnet_jax.models.report", "--config", "configs/voc.py:emanet",
        "--config.model.backbone=resnet_tiny", "--config.model.base_width=8",
        "--config.model.head_channels=256", "--image_size=33",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "head C=256 (K=64, T=3)" in done.stdout
    assert "+45.2 GFLOPs, +5.15 M" in done.stdout  # the paper's numbers for C = 256
    # Which variant it reports (issue 15, Found 10).
    assert done.stdout.startswith("--config configs/voc.py:emanet\n")
    assert "Model: EMANet unit: eta 1, T 3, K 64, temperature 1, L2-normalised bases, " \
        "gradient-free EM." in done.stdout
