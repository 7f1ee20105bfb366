"""Full HEMNet train step: images/s, peak memory and model FLOPs utilisation, JAX beside PyTorch.

The JAX step is `hemnet_jax.training.train_step.make_train_step` (forward, loss, backward, SGD
update, BN and bases updates) over a mesh of all local devices, on synthetic images and labels
already on device (the input pipeline has its own benchmark). Peak memory: the allocator's peak
where the device reports one (GPU, TPU), and the compiled executable's peak (XLA memory analysis,
per device) everywhere. MFU = XLA cost-analysis FLOPs of the compiled step (per device) / step
time / the device's peak dense bf16 matrix FLOP/s (PEAK_TFLOPS by device kind, or
--peak_tflops); the same peak for float32 runs, so fp32 and bf16 MFU compare against one
hardware limit. XLA counts a `scan` body once (the HEM loop's T iterations as one) and only
conv taps inside the unpadded input (less than a dense count for dilated convs); the dense
count, 3 x 2 x the forward's conv multiply-adds (`hemnet_jax.models.report.conv_macs`), is reported
beside it as mfu_dense.

PyTorch: the same network (`torch_reference.model_from_config`: dilated ResNet, HEM unit,
head) trained eagerly by the loop EMANet's code runs (forward under autocast to bfloat16 with
--dtype bfloat16, i.e. AMP; cross-entropy; backward; SGD with momentum and weight decay), on one
device of the kind JAX uses with the per-device batch. It runs first, in a child process
(`--framework torch`), so that neither library holds the other's device memory or spins
threads during the other's timing. speedup = JAX images/s per device / PyTorch images/s.

  python benchmarks/train_step.py                                     # CPU-sized default
  python benchmarks/train_step.py --backbone resnet101 --crop_size 513 --batch_size 16 \
      --dtype bfloat16                                                # the paper's setting
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hemnet_jax import config as cfg
from hemnet_jax.models import create_model, report
from hemnet_jax.training import sharding
from hemnet_jax.training.state import init_state, optimizer_for
from hemnet_jax.training.train_step import make_train_step

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
    """The flags; defaults that depend on the device are filled in by `resolve_defaults`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default=None, help="default: resnet50 on CPU, else resnet101")
    p.add_argument("--output_stride", type=int, default=8)
    p.add_argument("--base_width", type=int, default=64)
    p.add_argument("--crop_size", type=int, default=None, help="default: 129 on CPU, else 513")
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
    p.add_argument("--framework", default="both", choices=("both", "jax", "torch"),
                   help="both: PyTorch (child process, when installed) then JAX")
    p.add_argument("--torch_channels_last", action="store_true",
                   help="PyTorch model and images in channels_last memory format")
    p.add_argument("--quick", action="store_true", help="tiny model and crop, 2 steps (tests)")
    p.add_argument("--json", default=str(common.RESULTS_DIR / "train_step.json"))
    return p.parse_args(argv)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the device-dependent defaults (this initialises JAX's backend)."""
    on_cpu = jax.default_backend() == "cpu"
    if args.quick:
        args.backbone, args.base_width, args.crop_size = "resnet_tiny", 4, 32
        args.head_channels = args.head_mid_channels = 16
        args.num_bases, args.num_iters, args.steps, args.warmup = 8, 2, 2, 1
    args.backbone = args.backbone or ("resnet50" if on_cpu else "resnet101")
    args.crop_size = args.crop_size or (129 if on_cpu else 513)
    if args.batch_size is None:
        args.batch_size = 2 * jax.device_count() if on_cpu else 16
    if args.steps is None:
        args.steps = 5 if on_cpu else 20
    return args


def synthetic_batch(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Global batch of normal images [B, crop, crop, 3] and uniform labels, seed 0."""
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.crop_size, args.crop_size)
    return {
        "image": rng.standard_normal((*shape, 3), np.float32),
        "label": rng.integers(0, NUM_CLASSES, shape, np.int32),
    }


def measure_torch(args: argparse.Namespace) -> dict[str, Any]:
    """PyTorch eager train steps of the same network on one device, per-device batch."""
    import torch
    import torch.nn.functional as F
    import torch_reference as ref

    device = ref.torch_device()
    config = cfg.base_config()
    torch.manual_seed(0)
    net = ref.model_from_config(model_config(args), NUM_CLASSES).to(device).train()
    memory_format = torch.channels_last if args.torch_channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms
        torch.cuda.reset_peak_memory_stats(device)
    batch = args.batch_size // jax.device_count()
    data = synthetic_batch(args)
    images = torch.from_numpy(data["image"][:batch]).permute(0, 3, 1, 2)
    images = images.to(device, memory_format=memory_format)
    labels = torch.from_numpy(data["label"][:batch]).long().to(device)
    t = config.train
    opt = torch.optim.SGD(net.parameters(), lr=t.learning_rate, momentum=t.momentum,
                          weight_decay=t.weight_decay)
    amp = args.dtype == "bfloat16"

    def step() -> torch.Tensor:
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = net(images)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    wait = ref.sync(device)
    for _ in range(args.warmup):
        wait(step())
    t0 = time.perf_counter()
    for _ in range(args.steps):  # queued back to back, as the training loop does
        loss = step()
    wait(loss)
    step_s = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "torch_device": str(device), "torch_batch": batch, "torch_step_ms": 1e3 * step_s,
        "torch_images_per_s": batch / step_s, "torch_loss": float(loss),
        "torch_peak_gib": None if peak is None else peak / 2.0**30,
        "torch_channels_last": args.torch_channels_last, "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }


def torch_in_child(argv: list[str]) -> dict[str, Any] | None:
    """`measure_torch` in a child process (this one has not touched a device yet); None, with
    the reason printed, where PyTorch is not installed or cannot run on JAX's device kind."""
    if importlib.util.find_spec("torch") is None:
        print("PyTorch is not installed: no PyTorch comparison (pip install torch).")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "torch.json"
        # The child reads JAX's backend for the defaults: no preallocation of device memory.
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        command = [sys.executable, __file__, *argv, "--framework", "torch", "--json", str(out)]
        done = subprocess.run(command, env=env, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"PyTorch comparison failed, JAX alone follows: {reason}", file=sys.stderr)
            return None
        (row,) = json.loads(out.read_text())["rows"]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    start = time.perf_counter()
    torch_row = torch_in_child(argv) if args.framework == "both" else None
    args = resolve_defaults(args)
    if args.framework == "torch":
        import torch  # noqa: F401  (recorded by common.machine)

        row = measure_torch(args)
        columns = [("torch_device", "device", ""), ("torch_batch", "batch", "d"),
                   ("torch_step_ms", "PyTorch step ms", ".1f"),
                   ("torch_images_per_s", "images/s", ".2f"), ("torch_peak_gib", "peak GiB", ".2f")]
        return report_and_write(args, [row], columns, start, "PyTorch eager")
    config = cfg.base_config()
    config.model = model_config(args)
    config.train.batch_size = args.batch_size
    mesh = sharding.create_mesh()
    devices = list(mesh.devices.flat)
    model = create_model(config.model, NUM_CLASSES)
    tx, schedule = optimizer_for(config, model)
    state = init_state(config, model, tx, mesh)
    batch = sharding.global_batch(synthetic_batch(args), mesh)
    key = jax.device_put(jax.random.PRNGKey(1), sharding.replicated(mesh))

    t0 = time.perf_counter()
    compiled = make_train_step(model, tx, schedule, config, mesh).lower(
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
    if torch_row:
        row.update(torch_row)
        row["speedup"] = row["images_per_s"] / len(devices) / torch_row["torch_images_per_s"]
    columns = [
        ("backbone", "backbone", ""), ("crop", "crop", "d"), ("batch", "batch", "d"),
        ("dtype", "dtype", ""), ("remat", "remat", ""), ("step_ms", "step ms", ".1f"),
        ("images_per_s", "images/s", ".2f"), ("compiled_peak_gib", "compiled peak GiB", ".2f"),
        ("device_peak_gib", "device peak GiB", ".2f"),
        ("xla_tflop_per_step_per_device", "XLA TFLOP/step/dev", ".3f"),
        ("mfu", "MFU", ".1%"), ("mfu_dense", "MFU dense", ".1%"), ("compile_s", "compile s", ".0f"),
        ("torch_step_ms", "torch step ms", ".1f"), ("torch_images_per_s", "torch images/s", ".2f"),
        ("torch_peak_gib", "torch peak GiB", ".2f"), ("speedup", "speedup", ".2f"),
    ]
    print(f"OS {args.output_stride}; {args.steps} timed steps after {args.warmup} warm-up; peak "
          f"{peak or '-'} TFLOP/s")
    return report_and_write(args, [row], columns, start, "JAX")


def report_and_write(
    args: argparse.Namespace, rows: list[dict[str, Any]], columns: list[tuple[str, str, str]],
    start: float, what: str,
) -> dict[str, Any]:
    """Prints the machine line and the table, writes the JSON (args, machine, rows)."""
    info = common.machine()
    print(f"{what}: {info['devices']} ({info['cpu']}, {info['cpu_cores_available']} cores)")
    print(common.format_table(rows, columns))
    wall = time.perf_counter() - start
    print(f"wall time {wall:.0f} s")
    result = {"benchmark": "train_step", **info, "args": vars(args), "wall_s": wall, "rows": rows}
    print(f"wrote {common.write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
