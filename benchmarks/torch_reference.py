"""PyTorch HEMNet (dilated ResNet, HEM unit, head), written only to time JAX against PyTorch eager.

The same math as `hemnet_jax.hem` / `hem_unit` / `models` in EMANet's NCHW layout
(x [B, C, N], bases [B, C, K], torch.bmm): conv1x1 -> T x (E-step, N-step) -> R-step -> ReLU ->
conv1x1 -> BN -> (+ x) -> ReLU; the head is ConvBNReLU(3x3) -> unit -> ConvBNReLU(3x3) ->
Dropout2d -> conv1x1 -> bilinear resize (align_corners=True); the backbone is torchvision's
Bottleneck ResNet with EMANet's deep stem and dilations (`hemnet_jax.models.resnet.block_layout`),
under torchvision's module names. As in the JAX code, the EM loop runs in float32 also under
autocast (AMP), and `load_flax` copies a Flax model's variables in, so both compute the same
function (tests/test_benchmarks.py checks it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hemnet_jax.models import weights
from hemnet_jax.models.resnet import EXPANSION, block_layout, stage_sizes

EPS = 1e-6  # hemnet_jax.hem.EPS


def unrolled_hem(
    x: torch.Tensor,
    mu: torch.Tensor,
    *,
    num_iters: int,
    step_size: float,
    temperature: float,
    kernel: str = "dot",
    l2_normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T x (E-step, N-step). x [B, C, N], mu [B, C, K] -> (mu_T [B, C, K], gamma_T [B, N, K])."""
    xt = x.transpose(1, 2)  # [B, N, C]
    gamma = None
    for _ in range(num_iters):
        logits = torch.bmm(xt, mu)  # [B, N, K]
        if kernel == "rbf":
            logits = 2.0 * logits - mu.square().sum(1, keepdim=True)
        gamma = torch.softmax(logits / temperature, dim=-1)
        gamma_bar = gamma / (EPS + gamma.sum(1, keepdim=True))
        mu = (1.0 - step_size) * mu + step_size * torch.bmm(x, gamma_bar)  # [B, C, K]
        if l2_normalize:
            mu = mu / (EPS + mu.norm(dim=1, keepdim=True))
    return mu, gamma


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 unchanged (as the JAX unit)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def r_step(gamma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """x_tilde [B, C, N] = mu gamma^T."""
    return torch.bmm(mu, gamma.transpose(1, 2))


class HEMUnit(nn.Module):
    """The HEM unit on NCHW tensors; `mu` [K, C] is a buffer, as the Flax unit's `bases`."""

    def __init__(
        self,
        channels: int,
        num_bases: int = 64,
        num_iters: int = 3,
        step_size: float = 0.5,
        temperature: float | None = None,
        kernel: str = "dot",
        l2_normalize: bool = False,
        stop_em_gradient: bool = False,
        bases_momentum: float = 0.9,
        bn_momentum: float = 0.1,  # PyTorch convention (Flax's 0.9)
        bn_epsilon: float = 1e-5,
    ):
        super().__init__()
        self.num_iters, self.step_size, self.kernel = num_iters, step_size, kernel
        self.temperature = math.sqrt(channels) if temperature is None else temperature
        self.l2_normalize, self.stop_em_gradient = l2_normalize, stop_em_gradient
        self.bases_momentum = bases_momentum
        self.conv_in = nn.Conv2d(channels, channels, 1, bias=True)
        self.conv_out = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(channels, eps=bn_epsilon, momentum=bn_momentum)
        mu = torch.randn(num_bases, channels) * math.sqrt(2.0 / num_bases)
        self.register_buffer("mu", mu / (EPS + mu.norm(dim=1, keepdim=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        feats = self.conv_in(x).flatten(2)
        mu0 = self.mu.t().unsqueeze(0).expand(b, -1, -1)
        with torch.autocast(x.device.type, enabled=False), torch.set_grad_enabled(
            torch.is_grad_enabled() and not self.stop_em_gradient
        ):
            mu, gamma = unrolled_hem(
                at_least_float32(feats), mu0, num_iters=self.num_iters, step_size=self.step_size,
                temperature=self.temperature, kernel=self.kernel, l2_normalize=self.l2_normalize,
            )
        with torch.autocast(x.device.type, enabled=False):
            x_tilde = r_step(gamma, mu).view(b, c, h, w)
        if self.training:
            with torch.no_grad():  # out of place: the loop may have saved mu0 for backward
                m = self.bases_momentum
                self.mu = m * self.mu + (1.0 - m) * mu.mean(0).t()
        y = self.bn_out(self.conv_out(F.relu(x_tilde)))
        return F.relu(y + x)


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, bn_momentum: float, bn_epsilon: float):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=bn_epsilon, momentum=bn_momentum)
        self.relu = nn.ReLU()


class HEMHead(nn.Module):
    """HEMNet without its backbone: stage-4 features [B, Cin, h, w] -> logits [B, classes, H, W]."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        head_channels: int = 512,
        head_mid_channels: int = 256,
        dropout: float = 0.1,
        bn_momentum: float = 0.1,
        bn_epsilon: float = 1e-5,
        **unit_kwargs: Any,
    ):
        super().__init__()
        self.head_in = ConvBNReLU(in_channels, head_channels, bn_momentum, bn_epsilon)
        self.hem = HEMUnit(
            head_channels, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, **unit_kwargs
        )
        self.head_out = ConvBNReLU(head_channels, head_mid_channels, bn_momentum, bn_epsilon)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Module()
        self.classifier.conv = nn.Conv2d(head_mid_channels, num_classes, 1, bias=True)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.head_out(self.hem(self.head_in(features)))
        logits = at_least_float32(self.classifier.conv(self.dropout(x)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def unit_kwargs(m: Any) -> dict[str, Any]:
    """HEMUnit arguments from a `hemnet_jax.config` model config, as `models.create_model`."""
    return dict(
        num_bases=m.num_bases, num_iters=m.num_iters, step_size=m.step_size,
        temperature=m.temperature, kernel=m.kernel, l2_normalize=m.l2_normalize,
        stop_em_gradient=m.stop_em_gradient, bases_momentum=m.bases_momentum,
        bn_momentum=1.0 - m.bn_momentum, bn_epsilon=m.bn_epsilon,
    )


def unit_from_config(m: Any, channels: int) -> HEMUnit:
    return HEMUnit(channels, **unit_kwargs(m))


def head_from_config(m: Any, in_channels: int, num_classes: int) -> HEMHead:
    return HEMHead(
        in_channels, num_classes, head_channels=m.head_channels,
        head_mid_channels=m.head_mid_channels, dropout=m.dropout, **unit_kwargs(m),
    )


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3 conv) with a dilated 3x3 conv."""

    def __init__(self, cin: int, width: int, stride: int, dilation: int, project: bool,
                 bn: Callable[[int], nn.BatchNorm2d]):
        super().__init__()
        cout = EXPANSION * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = bn(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), bn(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout)) if project
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """Dilated ResNet, images [B, 3, H, W] -> stage-4 features [B, 32 * base_width, h, w]."""

    def __init__(self, stage_sizes: tuple[int, ...], stem: str = "deep", base_width: int = 64,
                 output_stride: int = 8, multi_grid: tuple[int, ...] = (1, 2, 4),
                 bn_momentum: float = 0.1, bn_epsilon: float = 1e-5):
        super().__init__()
        self.stem, w = stem, base_width

        bn = functools.partial(nn.BatchNorm2d, eps=bn_epsilon, momentum=bn_momentum)

        def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)

        if stem == "deep":  # conv1.0 / .1 / .3 / .4 / .6, bn1: weights.STEM_NAMES["deep"]
            self.conv1 = nn.Sequential(conv3x3(3, w, 2), bn(w), nn.ReLU(), conv3x3(w, w), bn(w),
                                       nn.ReLU(), conv3x3(w, 2 * w))
            cin = 2 * w
        else:
            self.conv1, cin = nn.Conv2d(3, w, 7, 2, padding=3, bias=False), w
        self.bn1 = bn(cin)
        layout = block_layout(stage_sizes, output_stride, multi_grid)
        for stage, blocks in enumerate(layout):
            layers = []
            for i, (stride, dilation) in enumerate(blocks):
                width = w * 2**stage
                layers.append(Bottleneck(cin, width, stride, dilation, i == 0, bn))
                cin = EXPANSION * width
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class HEMNet(HEMHead):
    """The whole network: images [B, 3, H, W] -> logits [B, classes, H, W] float32. The head's
    modules sit at the top level and the ResNet under `backbone`, as in the Flax HEMNet."""

    def __init__(self, backbone: ResNet, in_channels: int, num_classes: int, **head_kwargs: Any):
        super().__init__(in_channels, num_classes, **head_kwargs)
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(self.backbone(images), size=tuple(images.shape[-2:]))


def model_from_config(m: Any, num_classes: int) -> HEMNet:
    """The PyTorch twin of `hemnet_jax.models.create_model(m, num_classes)` (no aux head)."""
    if m.aux_head:
        raise ValueError("The PyTorch reference has no auxiliary head: set model.aux_head=False.")
    kwargs = unit_kwargs(m)
    backbone = ResNet(
        stage_sizes(m.backbone), stem=m.stem, base_width=m.base_width,
        output_stride=m.output_stride, multi_grid=tuple(m.multi_grid),
        bn_momentum=kwargs["bn_momentum"], bn_epsilon=kwargs["bn_epsilon"],
    )
    return HEMNet(
        backbone, 8 * EXPANSION * m.base_width, num_classes, head_channels=m.head_channels,
        head_mid_channels=m.head_mid_channels, dropout=m.dropout, **kwargs,
    )


def torch_device() -> torch.device:
    """The PyTorch device of the kind JAX computes on, so both are timed on the same hardware:
    CUDA when JAX runs on a GPU (PyTorch must be a CUDA build then), else the CPU."""
    backend = jax.default_backend()
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "gpu" and torch.cuda.is_available():
        return torch.device("cuda")
    raise RuntimeError(
        f"JAX runs on {backend} but PyTorch {torch.__version__} cannot use that device "
        f"(CUDA available: {torch.cuda.is_available()}). Install a CUDA build of PyTorch "
        "(pip install torch --index-url https://download.pytorch.org/whl/cu126), or time JAX "
        "alone (hem_unit.py --no_torch, train_step.py --framework jax)."
    )


# Flax leaf name -> (PyTorch name, how the array is laid out for PyTorch).
_LEAVES = {
    "kernel": ("weight", lambda a: a.transpose(3, 2, 0, 1)),  # HWIO -> OIHW
    "bias": ("bias", lambda a: a),
    "scale": ("weight", lambda a: a),
    "mean": ("running_mean", lambda a: a),
    "var": ("running_var", lambda a: a),
    "mu": ("mu", lambda a: a),
}


def load_flax(module: nn.Module, variables: dict[str, Any]) -> nn.Module:
    """Copies Flax variables (params, batch_stats, bases) into `module`, whose submodule names
    mirror the Flax ones (`hem/conv_in/kernel` -> `hem.conv_in.weight`; the backbone's under
    torchvision's names, `weights.torch_key`). Every tensor of the module must be set exactly
    once."""
    targets = dict(module.state_dict())
    targets = {k: v for k, v in targets.items() if not k.endswith("num_batches_tracked")}
    done = set()
    for collection in ("params", "batch_stats", "bases"):
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get(collection, {})))
        for path, value in flat.items():
            name, layout = _LEAVES[path[-1]]
            if path[0] == "backbone":
                stem = module.backbone.stem
                key = "backbone." + weights.torch_key(collection, path[1:], stem)
            else:
                key = ".".join((*path[:-1], name))
            if key not in targets:
                raise KeyError(f"{'/'.join(path)} ({collection}) has no PyTorch tensor {key}.")
            array = layout(np.asarray(value, np.float32))
            targets[key].copy_(torch.tensor(array).reshape(targets[key].shape))
            done.add(key)
    missing = set(targets) - done
    if missing:
        raise KeyError(f"Not set from the Flax variables: {sorted(missing)}.")
    return module


def sync(device: torch.device) -> Any:
    """A function that waits for `device`'s queued work (CUDA) and returns its argument."""

    def wait(out: Any) -> Any:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return wait
