"""The configuration schema: every key a run may set, with the paper's defaults.

`configs/*.py` start from `base_config()` and change values; they never add keys, so a mistyped
`--config.key=value` override fails with the key named (ml_collections' locked ConfigDict).
"""

from __future__ import annotations

import ml_collections

from hemnet_jax.errors import UserError


class UnknownVariantError(ValueError, UserError):
    """`--config FILE:VARIANT` names a variant the file does not have."""


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
    m.head_mid_channels = 256  # channels of the ConvBNReLU after the HEM unit (256 in the paper)
    m.dropout = 0.1
    m.aux_head = False  # FCN head on stage 3 (1024 -> 256 -> classes); training-only extra loss
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
    # The unit's first 1x1 conv held at its initialisation (bias: PyTorch's default U(+-1/sqrt(C)))
    # and left out of the optimiser, as EMANet's no_grad EM loop leaves it. True in `emanet`.
    m.freeze_unit_conv_in = False
    # Normalisation and precision.
    m.bn_momentum = 0.9997  # Flax convention: EMANet's BN_MOM = 3e-4 in PyTorch's (1 - m)
    m.bn_epsilon = 1e-5
    m.dtype = "float32"  # compute dtype: float32 | bfloat16; params and statistics stay float32
    return m


def emanet(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The EMANet baseline as a config of HEMNet: eta = 1, temperature 1, L2-normalised bases,
    gradient-free EM, the unit's first conv frozen (as the official code leaves it)."""
    m.step_size = 1.0
    m.temperature = 1.0
    m.l2_normalize = True
    m.stop_em_gradient = True
    m.freeze_unit_conv_in = True
    return m


def data_config() -> ml_collections.ConfigDict:
    """The input pipeline: PASCAL VOC 2012 + SBD with EMANet's augmentation."""
    d = ml_collections.ConfigDict()
    d.name = "voc2012_aug"  # a TFDS builder of hemnet_jax.data
    d.data_dir = ""  # TFDS data_dir; "" is TFDS's default (~/tensorflow_datasets)
    d.manual_dir = ""  # where the downloaded archives are; "" is <data_dir>/downloads/manual
    d.train_split = ""  # "" is the dataset's training split (train_aug for VOC)
    d.eval_split = ""  # "" is the dataset's evaluation split (val)
    d.crop_size = 513
    d.allow_large_crop = False  # allow a crop larger than every image at the largest scale
    d.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
    d.shuffle_buffer = 1024
    d.eval_pad_size = 513  # whole images padded to this size at evaluation (VOC: at most 500)
    return d


def train_config() -> ml_collections.ConfigDict:
    """EMANet's recipe: SGD momentum 0.9, lr 0.009, poly 0.9 over 30k steps, batch 16."""
    t = ml_collections.ConfigDict()
    t.batch_size = 16  # global, over all devices of all processes
    t.num_steps = 30_000
    t.learning_rate = 0.009
    t.lr_power = 0.9  # poly: lr * (1 - step / num_steps) ** power
    t.lr_update_every = 1  # N: the poly rate recomputed every N steps (official EMANet: 10)
    # "valid_pixels": mean cross-entropy over the non-ignored pixels of the batch; "all_pixels"
    # (official EMANet): per crop, the sum over its valid pixels / all its pixels, then batch mean.
    t.loss_normalization = "valid_pixels"
    t.momentum = 0.9
    t.weight_decay = 1e-4  # not on BatchNorm parameters or biases
    t.bias_lr_mult = 2.0
    t.norm_bias_lr_mult = 1.0  # BatchNorm biases' lr multiple (official EMANet: 2, as conv biases)
    t.log_every = 20
    t.eval_every = 2_000  # validation mIoU every N steps (0: only at the end)
    t.validate_at_end = True  # validation after the last step (the ablation study evaluates itself)
    t.checkpoint_every = 1_000
    t.keep_checkpoints = 3
    t.profile = False  # a trace of a few steps into the workdir (TensorBoard's profile tab)
    t.grad_flow_every = 0  # per-HEM-layer gradient magnitudes every N steps (0: off)
    t.basis_diagnostics = True  # bases/* scalars every log_every (docs/diagnostics.md)
    t.state_sharding = "replicated"  # params/optimiser state on the mesh (training/sharding.py)
    return t


def eval_config() -> ml_collections.ConfigDict:
    """Evaluation: whole images, output stride as trained, single scale by default."""
    e = ml_collections.ConfigDict()
    e.batch_size = 8  # global
    e.num_iters = ml_collections.config_dict.placeholder(int)  # T_eval; None: T_train
    e.num_iters_sweep = ""  # e.g. "1,2,3,4,6,8,12,16": a Table-2-style sweep of T_eval
    e.multi_scale = False  # multi-scale + flip, averaging softmax probabilities
    e.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    e.flip = True  # with multi_scale
    e.max_batches = 0  # evaluate only this many batches (0: the whole split)
    e.basis_diagnostics = True  # bases/* diagnostics over the split (one more forward pass)
    # "fixed": every image padded to data.eval_pad_size (one compiled shape, batches of
    # eval.batch_size), the padding masked out of the HEM unit; "official" (EMANet's eval.py):
    # each image padded to the next size with size % output_stride == 1, one image at a time,
    # one compile per distinct padded shape.
    e.padding = "fixed"
    return e


def study_config() -> ml_collections.ConfigDict:
    """The gradient-flow study of Fig. 3 (`python -m hemnet_jax.studies.gradient_flow`)."""
    s = ml_collections.ConfigDict()
    s.num_images = 100  # fixed training crops the gradients are averaged over (paper: 100)
    s.batch_size = 16  # images per forward/backward pass (the loss is the mean over one batch)
    s.step_sizes = (0.1, 0.2, 0.4, 0.8, 1.0)  # eta values, each with the same weights
    s.num_iters = ml_collections.config_dict.placeholder(int)  # T of the study; None: model's
    s.seed = 0  # which training crops (the training pipeline's stream of this seed)
    s.train_mode = True  # BatchNorm on batch statistics (+ fixed dropout) as in a training step
    s.checkpoint_step = ml_collections.config_dict.placeholder(int)  # None: the latest
    return s


def official_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The official EMANet code's training and evaluation details (docs/reproducing.md): loss
    over every pixel of a crop, learning rate recomputed every 10 steps, BatchNorm biases at
    2x lr, images padded to the next 8k + 1 at evaluation. The paper configs (voc, context,
    cocostuff) start from it."""
    config.train.loss_normalization = "all_pixels"
    config.train.lr_update_every = 10
    config.train.norm_bias_lr_mult = 2.0
    config.eval.padding = "official"
    return config


def base_config() -> ml_collections.ConfigDict:
    """The full schema with the paper's VOC recipe; `configs/*.py` change values, never keys."""
    config = ml_collections.ConfigDict()
    config.model = model_config()
    config.data = data_config()
    config.train = train_config()
    config.eval = eval_config()
    config.study = study_config()
    config.seed = 0
    return config


def r50_os16(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ablation setting of the paper's Tables 1-2: ResNet-50 at output stride 16."""
    config.model.backbone = "resnet50"
    config.model.output_stride = 16
    return config


def apply_variants(
    config: ml_collections.ConfigDict, arg: str, variants: dict, source: str
) -> ml_collections.ConfigDict:
    """Applies the comma-separated `arg` (the part after ':' of `--config FILE:ARG`), each a
    name in `variants` mapping to a function of the whole config."""
    for name in filter(None, (v.strip() for v in arg.split(","))):
        if name not in variants:
            raise UnknownVariantError(
                f"Unknown variant {name!r} of {source}; known: {', '.join(sorted(variants))}."
            )
        variants[name](config)
    return config


VARIANTS = {"emanet": lambda c: emanet(c.model), "r50_os16": r50_os16}
