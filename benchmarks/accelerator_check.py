"""One command for the day a GPU or TPU is lent: HEM precision, the paper's train step, MFU, memory.

Gathers into one JSON what the other benchmarks measure separately:
  1. the paper-size train step (ResNet-101, OS 8, crop 513, global batch 16, bfloat16):
     images/s, MFU (XLA FLOPs and dense FLOPs), compiled and allocator peak memory, and PyTorch
     eager with AMP on the same device where a CUDA build of PyTorch and a GPU exist
     (`train_step.py`, run first, so that PyTorch's child process finds the device untouched);
  2. the HEM core (`hem.unrolled_hem` + R-step, `hem_unit.py`'s "core") at the paper's size
     (N = 65^2, K = 64, C = 512, T = 3; HEMNet eta 0.5 and EMANet's EM) on the device, its
     output and input gradient, in float32 (the backend's default matmul precision, and
     "highest") and with bfloat16 features (what the model's bfloat16 convs hand the unit; the EM
     math itself runs in float32, `hem._accum_dtype`), each against float64 on the same device
     (on the host CPU where the device is a TPU, which has no float64).

Made to finish within 8 minutes on one H100/H200 (not yet run on one: no accelerator was lent).
`--tiny`: tiny sizes, for CI on a CPU.

  python benchmarks/accelerator_check.py [--tiny] [--batch_size 16] [--peak_tflops P]
      [--json benchmarks/results/accelerator_check.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import hem_unit
import jax
import jax.numpy as jnp
import numpy as np
import train_step

PAPER_CORE = {"side": 65, "k": 64, "c": 512, "t": 3, "batch": 1}  # 513 / OS 8 = 65
TINY_CORE = {"side": 9, "k": 4, "c": 8, "t": 2, "batch": 1}
# (name, input dtype, matmul precision on the device)
SETTINGS = (
    ("float32", jnp.float32, "default"),
    ("float32_highest", jnp.float32, "highest"),
    ("bfloat16", jnp.bfloat16, "default"),
)


def clustered_features(point: dict[str, int], seed: int = 0) -> np.ndarray:
    """[B, N, C] float64 features drawn around K random centres (unit signal-to-noise), so
    that the attention sharpens over the iterations as on trained features."""
    rng = np.random.default_rng(seed)
    b, n, c, k = point["batch"], point["side"] ** 2, point["c"], point["k"]
    centres = rng.standard_normal((k, c))
    return centres[rng.integers(0, k, (b, n))] + rng.standard_normal((b, n, c))


def relative_error(value: Any, reference: np.ndarray) -> float:
    value = np.asarray(value, np.float64)
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def reference_device() -> jax.Device:
    """Where float64 runs: the device itself, but a TPU's host CPU (TPUs have no float64)."""
    return jax.devices("cpu")[0] if jax.default_backend() == "tpu" else jax.devices()[0]


def core_precision(point: dict[str, int]) -> list[dict[str, Any]]:
    """Per variant and setting: relative and max errors of the core's output (and, for HEM,
    of the gradient of mean(out^2) w.r.t. the features) against float64 (`reference_device`)."""
    x64 = clustered_features(point)
    device = reference_device()
    rows = []
    for variant in ("hem", "em"):
        m = hem_unit.model_config(variant, point, argparse.Namespace(step_size=0.5,
                                                                      dtype="float32"))
        forward, forward_backward, (_, mu0) = hem_unit.jax_functions(
            "core", m, jnp.asarray(x64, jnp.float32))
        mu0 = np.asarray(mu0, np.float64)
        with jax.enable_x64(True):
            args = jax.device_put((x64, mu0), device)
            ref_out = np.asarray(jax.jit(forward)(*args))
            ref_grad = np.asarray(jax.jit(forward_backward)(*args)[1])
        for name, dtype, precision in SETTINGS:
            args = (jnp.asarray(x64, dtype), jnp.asarray(mu0, jnp.float32))
            with jax.default_matmul_precision(precision):
                out = jax.jit(forward)(*args)
                grad = jax.jit(forward_backward)(*args)[1]
            row = {"variant": variant, "setting": name, "precision": precision,
                   "out_rel_err": relative_error(out, ref_out),
                   "out_max_abs_err": float(np.max(np.abs(np.asarray(out, np.float64)
                                                          - ref_out))),
                   "out_max_abs": float(np.max(np.abs(ref_out)))}
            if not m.stop_em_gradient:  # EM's loop is gradient-free: nothing to compare
                row["grad_rel_err"] = relative_error(grad, ref_grad)
            rows.append(row)
    return rows


def paper_train_step(args: argparse.Namespace) -> dict[str, Any]:
    """`train_step.py`'s row: JAX on every device, PyTorch AMP (child process) where it can."""
    if args.tiny:
        argv = ["--quick"]
    else:
        argv = ["--backbone", "resnet101", "--output_stride", "8", "--crop_size", "513",
                "--batch_size", str(args.batch_size), "--dtype", "bfloat16", "--steps",
                str(args.steps)]
    if args.peak_tflops:
        argv += ["--peak_tflops", str(args.peak_tflops)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train_step.json"
        train_step.main([*argv, "--json", str(path)])
        (row,) = json.loads(path.read_text())["rows"]
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (CI on a CPU)")
    p.add_argument("--batch_size", type=int, default=16, help="global batch of the train step")
    p.add_argument("--steps", type=int, default=20, help="timed train steps")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="device peak for MFU (default: train_step.PEAK_TFLOPS by device kind)")
    p.add_argument("--json", default=str(common.RESULTS_DIR / "accelerator_check.json"))
    return p.parse_args(argv)


PRECISION_COLUMNS = [
    ("variant", "variant", ""), ("setting", "setting", ""),
    ("out_rel_err", "output rel. err", ".2e"), ("out_max_abs_err", "output max abs err", ".2e"),
    ("grad_rel_err", "grad rel. err", ".2e"),
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    step = paper_train_step(args)  # first: its PyTorch child needs the device untouched
    point = TINY_CORE if args.tiny else PAPER_CORE
    precision = core_precision(point)
    info = common.machine()
    print(f"\nHEM core (N = {point['side']}^2, K = {point['k']}, C = {point['c']}, "
          f"T = {point['t']}) on {info['devices']} against float64 on "
          f"{reference_device().device_kind}:")
    print(common.format_table(precision, PRECISION_COLUMNS))
    wall = time.perf_counter() - start
    print(f"accelerator check: wall time {wall:.0f} s")
    result = {"benchmark": "accelerator_check", **info, "args": vars(args), "wall_s": wall,
              "train_step": step, "hem_core_point": point, "hem_core_precision": precision,
              "float64_on": reference_device().device_kind}
    print(f"wrote {common.write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
