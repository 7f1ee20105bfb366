"""Parameters, FLOPs and peak memory of the model, next to the HEMNet paper's Table 3.

  python -m hemnet_jax.models.report --config configs/voc.py [--config.model.head_channels=256]

Everything is computed from abstract shapes (`jax.ShapeDtypeStruct`): the forward is lowered and
compiled for the local backend (CPU here) without allocating parameters or images. FLOPs come
from XLA's cost analysis of the compiled inference forward (batch 1, train=False); the head's
share is the full model minus the backbone alone. Memory is the compiled executable's footprint
(arguments + outputs + temporaries - aliased), from its memory analysis.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import flags

from hemnet_jax import cli, config_check
from hemnet_jax.models import create_model
from hemnet_jax.models.layers import Conv1x1

# HEMNet (AAAI 2021) Table 3: ResNet-101, OS 8, 513x513. Head = over the backbone.
PAPER_BACKBONE_FLOPS = 370e9
PAPER_HEAD = {256: (45.2e9, 5.15e6), 512: (92.3e9, 10.6e6)}  # C -> (FLOPs, params)
# EMANet (ICCV 2019) Table 1, same setting, counting multiply-adds: ResNet-101 190.6 G, 42.6 M.
EMANET_BACKBONE = (190.6e9, 42.6e6)


@dataclasses.dataclass(frozen=True)
class Cost:
    """Cost of one function (batch 1 forward)."""

    flops: float  # XLA's cost analysis of the compiled function
    conv_macs: float  # dense conv multiply-adds, as PyTorch FLOP counters count (see conv_macs)
    peak_bytes: int  # arguments + outputs + temporaries of the compiled function


@dataclasses.dataclass(frozen=True)
class Report:
    backbone_params: int
    head_params: int  # main head: everything but the backbone and the auxiliary head
    aux_params: int
    backbone: Cost
    full: Cost
    flops_per_madd: float
    image_size: int


def count_params(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def compiled_cost(compiled: jax.stages.Compiled) -> tuple[float, int]:
    """(FLOPs, bytes) of a compiled executable (per device for a partitioned program), from
    XLA's cost and memory analyses.

    Bytes = arguments + outputs + temporaries - aliased: the executable's whole footprint. Not
    `peak_memory_in_bytes`: on the CPU backend (jax 0.10.2) that is arguments + outputs only,
    whatever the temporaries (e.g. the same for T = 1 and T = 16 HEM iterations).
    """
    analysis = compiled.cost_analysis() or {}  # None: a compiler without cost analysis
    if isinstance(analysis, list | tuple):  # older JAX: one dict per computation
        analysis = analysis[0]
    mem = compiled.memory_analysis()
    footprint = (
        mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    return float(analysis.get("flops", 0.0)), int(footprint)


def xla_cost(fn: Callable[..., Any], *args: Any) -> tuple[float, int]:
    """(FLOPs, bytes) of `fn` lowered and compiled for abstract (or concrete) args."""
    return compiled_cost(jax.jit(fn).lower(*args).compile())


def conv_macs(fn: Callable[..., Any], *args: Any) -> float:
    """Dense multiply-adds of every nn.Conv (and `Conv1x1`) that `fn` calls:
    out_h * out_w * k * k * Cin * Cout.

    This is how FLOP counters of PyTorch models (thop, ptflops, fvcore) count convs. XLA's cost
    analysis counts only the taps that fall inside the unpadded input, which is much less for
    the strongly dilated 3x3 convs of layer4 (dilation 16 on a 65x65 map).
    """
    total = 0.0

    def record(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        nonlocal total
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__":
            return out
        if isinstance(module, nn.Conv):
            cin = args[0].shape[-1] // module.feature_group_count
            total += math.prod(out.shape[:-1]) * math.prod(module.kernel_size) * cin * out.shape[-1]
        elif isinstance(module, Conv1x1):  # 1x1 convs computed as matmuls
            total += math.prod(out.shape[:-1]) * args[0].shape[-1] * out.shape[-1]
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda *a: fn(*a), *args)  # a new function: no cached trace to reuse
    return total


def measure(fn: Callable[..., Any], *args: Any) -> Cost:
    flops, peak = xla_cost(fn, *args)
    return Cost(flops=flops, conv_macs=conv_macs(fn, *args), peak_bytes=peak)


def flops_per_multiply_add() -> float:
    """XLA's FLOPs per multiply-add, measured on a matmul and a conv of known size (2.0 today).

    The conv is unpadded, as XLA does not count taps on padding. Raises if the two disagree.
    """
    f32 = jnp.float32
    a, b = jax.ShapeDtypeStruct((64, 128), f32), jax.ShapeDtypeStruct((128, 32), f32)
    matmul = xla_cost(jnp.matmul, a, b)[0] / (64 * 128 * 32)
    x, w = jax.ShapeDtypeStruct((1, 16, 16, 8), f32), jax.ShapeDtypeStruct((3, 3, 8, 4), f32)

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    conv_ratio = xla_cost(conv, x, w)[0] / (14 * 14 * 4 * 3 * 3 * 8)
    if not math.isclose(matmul, conv_ratio, rel_tol=0.01):
        raise RuntimeError(f"XLA counts {matmul} FLOPs per matmul MAC, {conv_ratio} per conv MAC.")
    return matmul


def model_report(
    model_config: ml_collections.ConfigDict, *, num_classes: int = 21, image_size: int = 513
) -> Report:
    """Parameter counts and costs of the model's inference forward, from abstract shapes."""
    model = create_model(model_config, num_classes)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), images
    )

    def full(v: Any, x: jax.Array) -> jax.Array:
        return model.apply(v, x, train=False)["logits"]  # the auxiliary head is dead code here

    def backbone(v: Any, x: jax.Array) -> jax.Array:
        return model.apply(v, x, method=lambda m, x: m.backbone(x, train=False)["stage4"])

    params = variables["params"]
    aux = sum(count_params(params[k]) for k in ("aux_conv", "aux_classifier") if k in params)
    backbone_params = count_params(params["backbone"])
    return Report(
        backbone_params=backbone_params,
        head_params=count_params(params) - backbone_params - aux,
        aux_params=aux,
        backbone=measure(backbone, variables, images),
        full=measure(full, variables, images),
        flops_per_madd=flops_per_multiply_add(),
        image_size=image_size,
    )


def format_report(report: Report, model_config: ml_collections.ConfigDict) -> str:
    """The table, with the paper's Table 3 (and EMANet's Table 1 backbone) beside it."""
    m, r = model_config, report
    giga, mega, gib = 1e9, 1e6, 2.0**30
    paper_head = PAPER_HEAD.get(m.head_channels)

    def row(name: str, params: float, cost: Cost, sign: str, paper: str) -> str:
        cells = (
            f"{params / mega:.2f} M",
            f"{cost.flops / giga:.2f}",
            f"{cost.flops / r.flops_per_madd / giga:.2f}",
            f"{cost.conv_macs / giga:.2f}",
            f"{cost.peak_bytes / gib:.2f} GiB",
        )
        return f"{name:<36}" + "".join(f"{sign + c:>12}" for c in cells) + f"   {paper}"

    head = Cost(
        r.full.flops - r.backbone.flops,
        r.full.conv_macs - r.backbone.conv_macs,
        r.full.peak_bytes - r.backbone.peak_bytes,
    )
    madd = f"{r.flops_per_madd:g}"
    lines = [
        f"Model: {attention_unit(m)}.",
        f"Inference forward (train=False), batch 1, {r.image_size}x{r.image_size}, compute dtype "
        f"{m.dtype}; XLA {jax.default_backend()} compiled cost and memory analysis.",
        f"XLA counts a multiply-add as {madd} FLOPs (measured on a matmul and a conv), and only "
        "the taps inside the unpadded input.",
        f"GMACs = XLA GFLOPs / {madd}. Dense conv GMACs count every tap (k*k*Cin*Cout per output "
        "pixel), as PyTorch FLOP counters do.",
        "The paper's 370 G for ResNet-101 counts FLOPs; EMANet's 190.6 G counts multiply-adds.",
        "",
        f"{'':<36}"
        + "".join(f"{h:>12}" for h in ("params", "XLA GFLOPs", "XLA GMACs", "conv GMACs", "peak"))
        + "   paper Table 3",
        row(
            f"{m.backbone} ({m.stem} stem, OS {m.output_stride})", r.backbone_params,
            r.backbone, " ",
            f"{PAPER_BACKBONE_FLOPS / giga:g} GFLOPs (EMANet Table 1: "
            f"{EMANET_BACKBONE[0] / giga:g} GMACs, {EMANET_BACKBONE[1] / mega:g} M)",
        ),
        row(
            f"head C={m.head_channels} (K={m.num_bases}, T={m.num_iters})", r.head_params, head,
            "+",
            f"+{paper_head[0] / giga:g} GFLOPs, +{paper_head[1] / mega:g} M"
            if paper_head else "-",
        ),
        row("total", r.backbone_params + r.head_params, r.full, " ", ""),
    ]
    lines.append(
        "Head parameters are exact for this layout; EMANet's +10.0 M / +4.87 M (C = 512 / 256) "
        "equal it without the C -> 256 ConvBNReLU."
    )
    if r.aux_params:
        lines.append(
            f"auxiliary FCN head (training only, not in the costs): +{r.aux_params / mega:.2f} M"
        )
    if (m.backbone, m.output_stride, r.image_size) != ("resnet101", 8, 513):
        lines.append("Note: Table 3 is ResNet-101, OS 8, 513x513; this setting differs.")
    return "\n".join(lines)


def attention_unit(m: ml_collections.ConfigDict) -> str:
    """Which attention unit `m` configures, in words (EMANet is the eta = 1 config)."""
    temperature = "sqrt(C)" if m.temperature is None else f"{m.temperature:g}"
    emanet = m.step_size == 1.0 and m.l2_normalize and m.stop_em_gradient
    name = "EMANet unit" if emanet else "HEMNet unit"
    return (f"{name}: eta {m.step_size:g}, T {m.num_iters}, K {m.num_bases}, temperature "
            f"{temperature}, {'L2-normalised' if m.l2_normalize else 'unnormalised'} bases, "
            f"{'gradient-free' if m.stop_em_gradient else 'back-propagated'} EM")


def main(argv: list[str]) -> None:
    cli.no_extra_arguments(argv)
    config = flags.FLAGS.config
    config_check.check(config)
    report = model_report(
        config.model, num_classes=flags.FLAGS.num_classes, image_size=flags.FLAGS.image_size
    )
    print(f"--config {cli.config_spec(sys.argv[1:])}")
    print(format_report(report, config.model))


def _define_flags() -> None:
    """Only when run as a program: importing this module defines no absl flags."""
    cli.define_config_flag("Config file, e.g. configs/voc.py.")
    flags.DEFINE_integer("image_size", 513, "Square input size (Table 3: 513).")
    flags.DEFINE_integer("num_classes", 21, "Classifier outputs (VOC: 21).")


if __name__ == "__main__":
    cli.run(main, _define_flags)
