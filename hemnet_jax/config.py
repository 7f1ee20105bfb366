"""The configuration schema: every key a run may set, with the paper's defaults.

`configs/*.py` start from `base_config()` and change values; they never add keys, so a mistyped
`--config.key=value` override fails with the key named (ml_collections' locked ConfigDict).
"""

from __future__ import annotations

import ml_collections


def model_config() -> ml_collections.ConfigDict:
    """HEMNet with a ResNet-101 backbone at output stride 8, C = 512, K = 64, T = 3, eta = 0.5."""
    m = ml_collections.ConfigDict()
    # Backbone.
    m.backbone = "resnet101"  # resnet50 | resnet101 | resnet152 | resnet_tiny (tests, demos)
    m.stem = "deep"  # deep (3x3 convs 64-64-128, EMANet) | torchvision (7x7)
    m.output_stride = 8  # 8 or 16
    m.multi_grid = (1, 2, 4)
    m.base_width = 64  # channels of the first stage's bottleneck; 64 for the real ResNets
    m.pretrained = ""  # local .pth / .safetensors ImageNet checkpoint; "" trains from scratch
    # Head.
    m.head_channels = 512  # C: 512 or 256 in the paper
    m.dropout = 0.1
    m.aux_head = False  # FCN head on stage 3
    m.aux_loss_weight = 0.4
    # HEM unit.
    m.num_bases = 64  # K
    m.num_iters = 3  # T_train
    m.step_size = 0.5  # eta
    m.temperature = ml_collections.config_dict.placeholder(float)  # None: sqrt(C)
    m.kernel = "dot"
    m.l2_normalize = False
    m.stop_em_gradient = False
    m.bases_momentum = 0.9
    m.remat = False  # jax.checkpoint around each HEM iteration
    # Normalisation and precision.
    m.bn_momentum = 0.9  # Flax convention (PyTorch momentum 0.1)
    m.bn_epsilon = 1e-5
    m.dtype = "float32"  # compute dtype: float32 | bfloat16; params and statistics stay float32
    return m


def emanet(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The EMANet baseline as a config of HEMNet: eta = 1, temperature 1, L2-normalised bases,
    gradient-free EM."""
    m.step_size = 1.0
    m.temperature = 1.0
    m.l2_normalize = True
    m.stop_em_gradient = True
    return m


def base_config() -> ml_collections.ConfigDict:
    """The full schema. Data, training and evaluation sections are filled by `configs/*.py`."""
    config = ml_collections.ConfigDict()
    config.model = model_config()
    config.seed = 0
    return config
