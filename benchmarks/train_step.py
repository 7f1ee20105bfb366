"""Full HEMNet train step: images/s, peak memory and model FLOPs utilisation, on every device.

The step is `hemnet_jax.trainer.make_train_step` (forward, loss, backward, SGD update, BN and
bases updates) over a mesh of all local devices, on synthetic images and labels already on
device (the input pipeline has its own benchmark). Peak memory: the allocator's peak where the
device reports one (GPU, TPU), and the compiled executable's peak (XLA memory analysis,
per device) everywhere. MFU = XLA cost-analysis FLOPs of the compiled step (per device) / step
time / the device's peak dense bf16 matrix FLOP/s (PEAK_TFLOPS by device kind, or
--peak_tflops); the same peak for float32 runs, so fp32 and bf16 MFU compare against one
hardware limit. XLA counts a `scan` body once (the HEM loop's T iterations as one) and only
conv taps inside the unpadded input (less than a dense count for dilated convs); the dense
count, 3 x 2 x the forward's conv multiply-adds (`hemnet_jax.report.conv_macs`), is reported
beside it as mfu_dense.

  python benchmarks/train_step.py                                     # CPU-sized default
  python benchmarks/train_step.py --backbone resnet101 --crop_size 513 --batch_size 16 \
      --dtype bfloat16                                                # the paper's setting
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import common
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hemnet_jax import config as cfg
from hemnet_jax import parallel, report, trainer
from hemnet_jax.models import create_model

# Peak dense bf16 matrix TFLOP/s per device, matched in order on the lower-cased device_kind.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.0),
    ("h100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200", 989.0),
    ("a100", 312.0),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5e", 197.0),
    ("tpu v5", 459.0),  # v5p
    ("tpu v6 lite", 918.0),  # v6e
    ("tpu v6e", 918.0),
)
NUM_CLASSES = 21


def peak_tflops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((peak for key, peak in PEAK_TFLOPS if key in kind), None)


MODEL_ARGS = ("backbone", "output_stride", "base_width", "head_channels", "head_mid_channels",
              "num_bases", "num_iters", "dtype", "remat")


def model_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """`config.model` with the flags of MODEL_ARGS (and EMANet's EM with --emanet)."""
    m = cfg.base_config().model
    for name in MODEL_ARGS:
        setattr(m, name, getattr(args, name))
    if args.emanet:
        cfg.emanet(m)
    return m


def dense_train_flops(model, variables: Any, batch_size: int, crop: int) -> float:
    """3 x 2 x the forward's dense conv multiply-adds (backward = 2 forwards), whole batch."""
    images = jax.ShapeDtypeStruct((batch_size, crop, crop, 3), jnp.float32)
    macs = report.conv_macs(
        lambda v, x: model.apply(v, x, train=False)["logits"], variables, images
    )
    return 3.0 * 2.0 * macs


def device_peak_bytes(devices: list[jax.Device]) -> int | None:
    """The allocator's peak over `devices`, where they report one (not on CPU)."""
    peaks = []
    for device in devices:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) if peaks else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    on_cpu = jax.default_backend() == "cpu"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50" if on_cpu else "resnet101")
    p.add_argument("--output_stride", type=int, default=8)
    p.add_argument("--base_width", type=int, default=64)
    p.add_argument("--crop_size", type=int, default=129 if on_cpu else 513)
    p.add_argument("--batch_size", type=int, default=None,
                   help="global batch (default: 2 per device on CPU, 16 elsewhere)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--head_channels", type=int, default=512)
    p.add_argument("--head_mid_channels", type=int, default=256)
    p.add_argument("--num_bases", type=int, default=64)
    p.add_argument("--num_iters", type=int, default=3)
    p.add_argument("--remat", action="store_true", help="jax.checkpoint around each HEM iteration")
    p.add_argument("--emanet", action="store_true", help="EMANet's EM settings (config.emanet)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (5 on CPU, 20 elsewhere)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="device peak for MFU (default: from the device kind)")
    p.add_argument("--quick", action="store_true", help="tiny model and crop, 2 steps (tests)")
    p.add_argument("--json", default=str(common.RESULTS_DIR / "train_step.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.backbone, args.base_width, args.crop_size = "resnet_tiny", 4, 32
        args.head_channels = args.head_mid_channels = 16
        args.num_bases, args.num_iters, args.steps, args.warmup = 8, 2, 2, 1
    if args.batch_size is None:
        args.batch_size = 2 * jax.device_count() if on_cpu else 16
    if args.steps is None:
        args.steps = 5 if on_cpu else 20
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    config = cfg.base_config()
    config.model = model_config(args)
    config.train.batch_size = args.batch_size
    mesh = parallel.create_mesh()
    devices = list(mesh.devices.flat)
    model = create_model(config.model, NUM_CLASSES)
    tx, schedule = trainer.optimizer_for(config, model)
    state = trainer.init_state(config, model, tx, mesh)
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.crop_size, args.crop_size)
    batch = parallel.global_batch({
        "image": rng.standard_normal((*shape, 3), np.float32),
        "label": rng.integers(0, NUM_CLASSES, shape, np.int32),
    }, mesh)
    key = jax.device_put(jax.random.PRNGKey(1), parallel.replicated(mesh))

    t0 = time.perf_counter()
    compiled = trainer.make_train_step(model, tx, schedule, config, mesh).lower(
        state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    flops, compiled_peak = report.compiled_cost(compiled)  # per device
    dense_flops = dense_train_flops(model, state.variables, args.batch_size, args.crop_size)

    for _ in range(args.warmup):
        state, metrics = compiled(state, batch, key)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.steps):  # dispatched back to back, as the training loop does
        state, metrics = compiled(state, batch, key)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / args.steps
    loss = float(metrics["loss"])

    device_peak = device_peak_bytes(devices)
    kind = devices[0].device_kind
    peak = args.peak_tflops or peak_tflops(kind)
    row: dict[str, Any] = {
        "backbone": args.backbone, "output_stride": args.output_stride, "crop": args.crop_size,
        "batch": args.batch_size, "dtype": args.dtype, "remat": args.remat,
        "devices": len(devices), "device_kind": kind,
        "step_ms": 1e3 * step_s, "images_per_s": args.batch_size / step_s,
        "compile_s": compile_s, "loss": loss,
        "xla_tflop_per_step_per_device": flops / 1e12,
        "dense_tflop_per_step": dense_flops / 1e12,
        "compiled_peak_gib": compiled_peak / 2.0**30,
        "device_peak_gib": None if device_peak is None else device_peak / 2.0**30,
        "peak_tflops": peak,
    }
    if peak:
        row["mfu"] = flops / step_s / (peak * 1e12)
        row["mfu_dense"] = dense_flops / len(devices) / step_s / (peak * 1e12)
    columns = [
        ("backbone", "backbone", ""), ("crop", "crop", "d"), ("batch", "batch", "d"),
        ("dtype", "dtype", ""), ("remat", "remat", ""), ("step_ms", "step ms", ".1f"),
        ("images_per_s", "images/s", ".2f"), ("compiled_peak_gib", "compiled peak GiB", ".2f"),
        ("device_peak_gib", "device peak GiB", ".2f"),
        ("xla_tflop_per_step_per_device", "XLA TFLOP/step/dev", ".3f"),
        ("mfu", "MFU", ".1%"), ("mfu_dense", "MFU dense", ".1%"), ("compile_s", "compile s", ".0f"),
    ]
    info = common.machine()
    print(f"{info['devices']} ({info['cpu']}, {info['cpu_cores_available']} cores); OS "
          f"{args.output_stride}; {args.steps} timed steps after {args.warmup} warm-up; peak "
          f"{peak or '-'} TFLOP/s")
    print(common.format_table([row], columns))
    wall = time.perf_counter() - start
    print(f"wall time {wall:.0f} s")
    result = {"benchmark": "train_step", **info, "args": vars(args), "wall_s": wall,
              "rows": [row]}
    print(f"wrote {common.write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
