"""HEM unit speed and memory: JAX (jit) beside PyTorch eager, HEM beside EM, growth in N, K, C, T.

Three modules, each timed forward and forward+backward (gradients w.r.t. parameters and input,
loss mean(out^2)), BatchNorm and bases in training mode:
  core: the EM loop alone, unrolled_hem + R-step, the O(NKTC) part of the paper's claim;
  unit: the HEM unit (conv1x1, EM loop, R-step, conv1x1, BN, residual), `hemnet_jax.HEMUnit`;
  head: HEMNet without its backbone, on stage-4 features (ConvBNReLU, unit, ConvBNReLU,
        classifier), the part a PyTorch HEMNet would run differently from a ResNet.
Variants: hem (eta = --step_size, gradients through the loop) and em (`config.emanet`: eta = 1,
gradient-free loop, L2-normalised bases, temperature 1). The PyTorch side
(`torch_reference.py`, same weights) runs in the same process on the device kind JAX uses (CUDA
when JAX runs on a GPU; bf16 autocast with --dtype bfloat16 there).
speedup = PyTorch time / JAX time.

By default one axis at a time is swept around the base point (N = 65^2, K = 64, C = 512, T = 3,
batch 1), bounded for a small CPU; --full runs the whole grid. Growth: least-squares slopes of
log(time) and log(XLA FLOPs) against log(axis) along each sweep (1 = linear). Memory: compiled
footprint (arguments + outputs + temporaries) of the unit's forward+backward against T, remat off
and on.

  python benchmarks/hem_unit.py [--full] [--quick] [--modules core,unit,head] [--no_torch]
      [--dtype float32|bfloat16] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from hemnet_jax import config as cfg
from hemnet_jax import hem
from hemnet_jax.models import create_model, report

AXES = ("side", "k", "c", "t", "batch")  # N = side^2 pixels
GRIDS = {
    "default": (
        {"side": (33, 65, 129), "k": (32, 64, 128), "c": (256, 512), "t": (1, 2, 3, 4, 8, 16),
         "batch": (1, 2, 4)},
        {"side": 65, "k": 64, "c": 512, "t": 3, "batch": 1},
    ),
    "quick": (
        {"side": (5, 9), "k": (4,), "c": (8,), "t": (2,), "batch": (1,)},
        {"side": 5, "k": 4, "c": 8, "t": 2, "batch": 1},
    ),
}
NUM_CLASSES = 21
MUTABLE = ["batch_stats", "bases"]


class Stage4Input(nn.Module):
    """Stands in for the backbone: the head's input is given as the features themselves."""

    @nn.compact
    def __call__(self, features: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        return {"stage4": features}


def model_config(
    variant: str, point: dict[str, int], args: argparse.Namespace, remat: bool = False
) -> ml_collections.ConfigDict:
    """The model config of one measurement: the paper's HEM, or EMANet's EM (`config.emanet`)."""
    m = cfg.base_config().model
    if variant == "em":
        cfg.emanet(m)
    else:
        m.step_size = args.step_size
    m.num_bases, m.num_iters, m.head_channels = point["k"], point["t"], point["c"]
    m.dtype, m.remat = args.dtype, remat
    return m


def jax_module(module: str, m: ml_collections.ConfigDict) -> nn.Module:
    """The Flax unit or head of config `m` (the head is HEMNet on given stage-4 features)."""
    model = create_model(m, NUM_CLASSES)
    return model.hem if module == "unit" else model.clone(backbone=Stage4Input())


def input_shape(module: str, point: dict[str, int], args: argparse.Namespace) -> tuple[int, ...]:
    b, s, c = point["batch"], point["side"], point["c"]
    if module == "core":
        return (b, s * s, c)
    return (b, s, s, args.head_in_channels if module == "head" else c)


def jax_functions(
    module: str, m: ml_collections.ConfigDict, x: jax.Array
) -> tuple[Callable, Callable, tuple]:
    """(forward, forward+backward, args) for jit; forward+backward returns the loss and the
    gradients w.r.t. the parameters (none for core) and the input."""
    if module == "core":
        temperature = m.temperature or math.sqrt(x.shape[-1])
        mu0 = jax.random.normal(jax.random.key(1), (m.num_bases, x.shape[-1]))
        mu0 = hem.l2_normalize_bases(mu0)

        def forward(x: jax.Array, mu0: jax.Array) -> jax.Array:
            mu, gamma = hem.unrolled_hem(
                x, mu0, num_iters=m.num_iters, step_size=m.step_size, temperature=temperature,
                kernel=m.kernel, l2_normalize=m.l2_normalize,
                stop_em_gradient=m.stop_em_gradient, remat=m.remat,
            )
            return hem.r_step(gamma, mu)

        def loss(x: jax.Array, mu0: jax.Array) -> jax.Array:
            return jnp.mean(jnp.square(forward(x, mu0).astype(jnp.float32)))

        return forward, jax.value_and_grad(loss), (x, mu0)

    model = jax_module(module, m)
    variables = model.init(jax.random.key(0), x, train=False)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def forward(params: Any, state: Any, x: jax.Array) -> Any:
        out, updates = model.apply({"params": params, **state}, x, train=True, mutable=MUTABLE,
                                   rngs={"dropout": jax.random.key(2)})
        return (out["logits"] if module == "head" else out), updates

    def loss(params: Any, state: Any, x: jax.Array) -> tuple[jax.Array, Any]:
        out, updates = forward(params, state, x)
        return jnp.mean(jnp.square(out.astype(jnp.float32))), updates

    return forward, jax.value_and_grad(loss, argnums=(0, 2), has_aux=True), (params, state, x)


def measure_jax(module: str, m: ml_collections.ConfigDict, shape: tuple[int, ...],
                timing: dict[str, Any], passes: tuple[str, ...] = ("fwd", "fwdbwd"),
                ) -> dict[str, Any]:
    """Compile time, XLA FLOPs and peak bytes, and best time of each pass ("fwd", "fwdbwd")."""
    x = jax.random.normal(jax.random.key(3), shape, jnp.float32)
    forward, forward_backward, fn_args = jax_functions(module, m, x)
    row: dict[str, Any] = {}
    fns = {"fwd": forward, "fwdbwd": forward_backward}
    for name in passes:
        fn = fns[name]
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*fn_args).compile()
        row[f"compile_{name}_s"] = time.perf_counter() - start
        row[f"flops_{name}"], row[f"peak_bytes_{name}"] = report.compiled_cost(compiled)
        t = common.time_call(lambda c=compiled: c(*fn_args), common.jax_sync, **timing)
        row[f"jax_{name}_ms"] = 1e3 * t.min_s
    return row


def measure_torch(module: str, m: ml_collections.ConfigDict, shape: tuple[int, ...],
                  dtype: str, timing: dict[str, Any]) -> dict[str, Any]:
    """PyTorch eager times of the same module (fresh weights: speed does not depend on them)."""
    import torch
    import torch_reference as ref

    device = ref.torch_device()
    amp = dtype == "bfloat16" and device.type == "cuda"
    nchw = (shape[0], shape[-1], shape[1], shape[2]) if module != "core" else None
    if module == "core":
        b, n, c = shape
        x = torch.randn(b, c, n, device=device, requires_grad=True)
        mu0 = torch.randn(b, c, m.num_bases, device=device)
        temperature = m.temperature or math.sqrt(c)
        grad_free = m.stop_em_gradient

        def run() -> torch.Tensor:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not grad_free):
                mu, gamma = ref.unrolled_hem(
                    x, mu0, num_iters=m.num_iters, step_size=m.step_size,
                    temperature=temperature, kernel=m.kernel, l2_normalize=m.l2_normalize,
                )
            return ref.r_step(gamma, mu)
    else:
        net = (ref.unit_from_config(m, shape[-1]) if module == "unit"
               else ref.head_from_config(m, shape[-1], NUM_CLASSES)).to(device).train()
        x = torch.randn(*nchw, device=device, requires_grad=True)

        def run() -> torch.Tensor:
            return net(x) if module == "unit" else net(x, size=nchw[2:])

    def forward() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            return run()

    def forward_backward() -> torch.Tensor:
        x.grad = None
        if module != "core":
            net.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            loss = run().float().square().mean()
        if loss.requires_grad:
            loss.backward()
        return loss

    wait = ref.sync(device)
    return {
        f"torch_{name}_ms": 1e3 * common.time_call(fn, wait, **timing).min_s
        for name, fn in (("fwd", forward), ("fwdbwd", forward_backward))
    }


def grid_points(args: argparse.Namespace) -> list[dict[str, int]]:
    """The whole grid with --full, else one axis at a time through the base point."""
    values, base = GRIDS["quick" if args.quick else "default"]
    if args.full:
        return [dict(zip(AXES, p, strict=True)) for p in itertools.product(*values.values())]
    points = [base]
    for axis in AXES:
        points += [{**base, axis: v} for v in values[axis] if v != base[axis]]
    return points


def growth(rows: list[dict[str, Any]], base: dict[str, int]) -> list[dict[str, Any]]:
    """Log-log slopes along each axis through the base point, per module, variant and metric."""
    metrics = ("flops_fwd", "jax_fwd_ms", "jax_fwdbwd_ms", "torch_fwd_ms", "torch_fwdbwd_ms")
    fits = []
    for module, variant in dict.fromkeys((r["module"], r["variant"]) for r in rows):
        group = [r for r in rows if (r["module"], r["variant"]) == (module, variant)]
        for metric in metrics:
            fit: dict[str, Any] = {"module": module, "variant": variant, "metric": metric}
            for axis in AXES:
                line = [r for r in group if r.get(metric) and all(
                    r[a] == base[a] for a in AXES if a != axis)]
                xs = [r["n"] if axis == "side" else r[axis] for r in line]
                fit["n" if axis == "side" else axis] = common.loglog_slope(
                    xs, [r[metric] for r in line])
            if any(fit[a] is not None for a in ("n", "k", "c", "t", "batch")):
                fits.append(fit)
    return fits


def remat_memory(args: argparse.Namespace, timing: dict[str, Any]) -> list[dict[str, Any]]:
    """The unit's forward+backward against T, remat off and on: compiled peak bytes and time."""
    values, base = GRIDS["quick" if args.quick else "default"]
    rows = []
    for t, remat in itertools.product((1, 2) if args.quick else values["t"], (False, True)):
        point = {**base, "t": t}
        m = model_config("hem", point, args, remat=remat)
        r = measure_jax("unit", m, input_shape("unit", point, args), timing, ("fwdbwd",))
        rows.append({"t": t, "remat": remat, "peak_mib": common.mib(r["peak_bytes_fwdbwd"]),
                     "jax_fwdbwd_ms": r["jax_fwdbwd_ms"], "flops_fwdbwd": r["flops_fwdbwd"]})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default="core,unit,head")
    parser.add_argument("--variants", default="hem,em")
    parser.add_argument("--step_size", type=float, default=0.5, help="eta of the hem variant")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--full", action="store_true", help="the whole N x K x C x T x batch grid")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (tests)")
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--head_in_channels", type=int, default=None,
                        help="backbone channels into the head (2048; 16 with --quick)")
    parser.add_argument("--head_side", type=int, default=None,
                        help="head input side (65 on accelerators, 33 on CPU, 5 with --quick)")
    parser.add_argument("--no_remat_table", action="store_true")
    parser.add_argument("--min_seconds", type=float, default=0.5, help="per timed function")
    parser.add_argument("--json", default=str(common.RESULTS_DIR / "hem_unit.json"))
    args = parser.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    if args.head_in_channels is None:
        args.head_in_channels = 16 if args.quick else 2048
    if args.head_side is None:
        args.head_side = 5 if args.quick else (33 if on_cpu else 65)
    return args


COLUMNS = [
    ("module", "module", ""), ("variant", "variant", ""), ("n", "N", "d"), ("k", "K", "d"),
    ("c", "C", "d"), ("t", "T", "d"), ("batch", "B", "d"),
    ("jax_fwd_ms", "jax fwd ms", ".2f"), ("torch_fwd_ms", "torch fwd ms", ".2f"),
    ("speedup_fwd", "speedup", ".2f"),
    ("jax_fwdbwd_ms", "jax f+b ms", ".2f"), ("torch_fwdbwd_ms", "torch f+b ms", ".2f"),
    ("speedup_fwdbwd", "speedup", ".2f"),
    ("gflops_fwd", "fwd GFLOP", ".3f"), ("peak_mib_fwdbwd", "f+b MiB", ".1f"),
]
FIT_COLUMNS = [("module", "module", ""), ("variant", "variant", ""), ("metric", "metric", "")] + [
    (a, f"slope {a}", ".2f") for a in ("n", "k", "c", "t", "batch")]
REMAT_COLUMNS = [("t", "T", "d"), ("remat", "remat", ""), ("peak_mib", "f+b MiB", ".1f"),
                 ("jax_fwdbwd_ms", "f+b ms", ".2f"), ("flops_fwdbwd", "f+b FLOPs", ".3g")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    timing = (dict(warmup=1, min_reps=1, min_seconds=0.0) if args.quick
              else dict(warmup=2, min_reps=5, min_seconds=args.min_seconds))
    use_torch = not args.no_torch
    if use_torch:
        import torch  # noqa: F401  (recorded by common.machine)
    start = time.perf_counter()
    rows = []
    for module in args.modules.split(","):
        points = grid_points(args)
        if module == "head":  # one point: the backbone's output size, the base K, C, T, batch
            points = [{**GRIDS["quick" if args.quick else "default"][1], "side": args.head_side}]
        for point, variant in itertools.product(points, args.variants.split(",")):
            m = model_config(variant, point, args)
            row = {"module": module, "variant": variant, **point, "n": point["side"] ** 2}
            row.update(measure_jax(module, m, input_shape(module, point, args), timing))
            row["gflops_fwd"] = row["flops_fwd"] / 1e9
            row["peak_mib_fwdbwd"] = common.mib(row["peak_bytes_fwdbwd"])
            rows.append(row)
    # PyTorch after all of JAX: interleaved, each library's idle worker threads (XLA's pool,
    # OpenMP) spin for a while after its calls and slow the other one down.
    for row in rows if use_torch else []:
        point = {a: row[a] for a in AXES}
        m = model_config(row["variant"], point, args)
        shape = input_shape(row["module"], point, args)
        row.update(measure_torch(row["module"], m, shape, args.dtype, timing))
        for p in ("fwd", "fwdbwd"):
            row[f"speedup_{p}"] = row[f"torch_{p}_ms"] / row[f"jax_{p}_ms"]
    base = GRIDS["quick" if args.quick else "default"][1]
    fits = growth([r for r in rows if r["module"] != "head"], base)
    remat_rows = [] if args.no_remat_table else remat_memory(args, timing)

    info = common.machine()
    print(f"\n{info['devices']} ({info['cpu']}, {info['cpu_cores_available']} cores), "
          f"dtype {args.dtype}; times: best of >= 5 calls, ms; speedup = PyTorch / JAX")
    print(common.format_table(rows, COLUMNS))
    print("\nGrowth: log-log slopes through the base point (1 = linear). XLA's cost analysis "
          "counts a scan body once, so flops_fwd does not grow with T by construction.")
    print(common.format_table(fits, FIT_COLUMNS))
    if remat_rows:
        print(f"\nunit forward+backward, hem, base point but T: remat off / on ({args.dtype})")
        print(common.format_table(remat_rows, REMAT_COLUMNS))
    wall = time.perf_counter() - start
    print(f"\nwall time {wall:.0f} s")
    result = {"benchmark": "hem_unit", **info, "args": vars(args), "base_point": base,
              "wall_s": wall, "rows": rows, "growth": fits, "remat": remat_rows}
    print(f"wrote {common.write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
