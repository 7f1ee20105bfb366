"""Models: the dilated ResNet backbone and HEMNet, built from `config.model`."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from hemnet_jax.models.hem_unit import HEMUnit
from hemnet_jax.models.hemnet import HEMNet
from hemnet_jax.models.resnet import ResNet, stage_sizes

__all__ = [
    "HEMNet", "HEMUnit", "ResNet", "create_backbone", "create_model", "frozen_param_prefixes",
]


def create_backbone(
    model_config: ml_collections.ConfigDict, *, axis_name: str | None = None
) -> ResNet:
    """The ResNet of `model_config` (backbone, stem, output_stride, multi_grid, base_width)."""
    return ResNet(
        stage_sizes=stage_sizes(model_config.backbone),
        stem=model_config.stem,
        base_width=model_config.base_width,
        output_stride=model_config.output_stride,
        multi_grid=tuple(model_config.multi_grid),
        bn_momentum=model_config.bn_momentum,
        bn_epsilon=model_config.bn_epsilon,
        dtype=jnp.dtype(model_config.dtype),
        axis_name=axis_name,
    )


def frozen_param_prefixes(model_config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], ...]:
    """Paths (prefixes) in `create_model`'s params that the optimiser must leave untouched: the
    HEM unit's first conv when `model.freeze_unit_conv_in` (EMANet's conv1, which its no_grad EM
    loop leaves without gradient, so SGD neither updates nor decays it)."""
    return (("hem", "conv_in"),) if model_config.freeze_unit_conv_in else ()


def create_model(
    model_config: ml_collections.ConfigDict, num_classes: int, *, axis_name: str | None = None
) -> HEMNet:
    """HEMNet (or EMANet, by its HEM settings) from `config.model`.

    axis_name: only for pmap/shard_map users (BatchNorm statistics and the bases' batch mean
    averaged over that axis); under jit with a sharded batch leave it None.
    """
    dtype = jnp.dtype(model_config.dtype)
    hem = HEMUnit(
        num_bases=model_config.num_bases,
        num_iters=model_config.num_iters,
        step_size=model_config.step_size,
        temperature=model_config.temperature,
        kernel=model_config.kernel,
        l2_normalize=model_config.l2_normalize,
        stop_em_gradient=model_config.stop_em_gradient,
        bases_momentum=model_config.bases_momentum,
        bn_momentum=model_config.bn_momentum,
        bn_epsilon=model_config.bn_epsilon,
        dtype=dtype,
        axis_name=axis_name,
        remat=model_config.remat,
        frozen_conv_in=model_config.freeze_unit_conv_in,
    )
    return HEMNet(
        backbone=create_backbone(model_config, axis_name=axis_name),
        hem=hem,
        num_classes=num_classes,
        head_channels=model_config.head_channels,
        head_mid_channels=model_config.head_mid_channels,
        dropout_rate=model_config.dropout,
        aux_head=model_config.aux_head,
        bn_momentum=model_config.bn_momentum,
        bn_epsilon=model_config.bn_epsilon,
        dtype=dtype,
        axis_name=axis_name,
    )
