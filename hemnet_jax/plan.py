"""Plan a Cloud TPU run on a CPU machine: compile a config's train and eval steps for a TPU slice.

  python -m hemnet_jax.plan --config configs/voc.py --topology v5e:2x4 [--config.KEY=V ...]
      [--max_batch] [--json FILE]

libtpu (the TPU compiler, `pip install -r requirements-test.txt`) builds compile-only devices of
the slice; the project's real train step (`training.train_step.make_train_step`, the state and
batch shardings of `training.sharding`) and its evaluation step (`evaluation.predictors`, at the
config's evaluation canvas) are compiled for them from abstract shapes: no TPU, dataset or
checkpoint. Every figure is the TPU compiler's (its buffer assignment, cost analysis and
optimised HLO), per chip; none is a measurement of a TPU. See docs/tpu.md.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from jax.sharding import Mesh

from hemnet_jax import cli, compiled_hlo, config_check, gpu_topology, tpu_topology
from hemnet_jax.data import datasets
from hemnet_jax.errors import UserError
from hemnet_jax.evaluation import predictors
from hemnet_jax.models import create_model, report
from hemnet_jax.training import sharding
from hemnet_jax.training.state import abstract_state, optimizer_for
from hemnet_jax.training.train_step import make_train_step

GIB = 2**30
MAX_PER_CHIP_BATCH = 4096  # --max_batch stops doubling here
# Forward-pass reductions that must span the whole slice in a training step: every BatchNorm's
# batch statistics and the HEM unit's batch mean of its final bases (mu0's moving average).
BATCH_STAT_OPS = {
    "BatchNorm statistics": r"^jit\(train_step\)/jvp\(HEMNet\)/.*bn\w*/reduce_sum$",
    "bases' batch mean": r"^jit\(train_step\)/jvp\(HEMNet\)/.*_update_bases/reduce_sum$",
}


class DoesNotFitError(MemoryError, UserError):
    """The config's step needs more HBM per chip than the chip has."""


class BadFlagError(ValueError, UserError):
    """A flag of this program with a value it cannot use."""


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One compiled step, per chip: the compiler's memory analysis (bytes), its cost analysis
    (FLOPs of one execution) and the collectives of its optimised HLO. A step the compiler
    refused for want of memory has `refused` (its message) and no figures (None)."""

    argument_bytes: int | None
    output_bytes: int | None
    temp_bytes: int | None
    total_bytes: int | None  # arguments + outputs + temporaries - aliased (donated) buffers
    flops_per_step: float | None  # None: the compiler gave no cost analysis
    compile_s: float
    fits: bool
    global_batch: int
    per_chip_batch: int
    collectives: dict[str, compiled_hlo.Collective]
    hlo: str = dataclasses.field(repr=False, compare=False)
    refused: str | None = None

    def json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in (
            "argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "flops_per_step",
            "compile_s", "fits", "global_batch", "per_chip_batch", "refused")}
        out["collectives"] = {k: dataclasses.asdict(v) for k, v in self.collectives.items()}
        return out


def compile_step(jitted: Any, args: tuple, *, hbm_bytes: int, global_batch: int,
                 per_chip_batch: int) -> StepPlan:
    """Lowers and compiles `jitted` for abstract `args` (their shardings name the devices).
    Far beyond the HBM, the TPU compiler refuses the program (RESOURCE_EXHAUSTED) instead of
    reporting its size: a step that does not fit, with the compiler's message."""
    start = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = str(e).splitlines()[0].split("RESOURCE_EXHAUSTED:", 1)[-1].strip()
        return StepPlan(
            argument_bytes=None, output_bytes=None, temp_bytes=None, total_bytes=None,
            flops_per_step=None, compile_s=round(time.perf_counter() - start, 1), fits=False,
            global_batch=global_batch, per_chip_batch=per_chip_batch, collectives={}, hlo="",
            refused=message)
    seconds = time.perf_counter() - start
    flops, total = report.compiled_cost(compiled)
    if not compiled.cost_analysis():  # the GPU compiler without a device gives none
        flops = None
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    return StepPlan(
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes), total_bytes=total, flops_per_step=flops,
        compile_s=round(seconds, 1), fits=total <= hbm_bytes, global_batch=global_batch,
        per_chip_batch=per_chip_batch, collectives=compiled_hlo.collectives(text), hlo=text,
    )


class Planner:
    """Compiles `config`'s steps for a mesh of compile-only devices of `topology`."""

    def __init__(self, config: ml_collections.ConfigDict, topology: tpu_topology.Topology,
                 devices: list[jax.Device], hbm_bytes: int | None = None):
        self.config, self.topology = config, topology
        self.hbm_bytes = topology.hbm_bytes_per_chip if hbm_bytes is None else hbm_bytes
        self.mesh = sharding.create_mesh(devices)
        self.num_classes = datasets.get_dataset_info(config.data.name).num_classes
        self.model = create_model(config.model, self.num_classes)
        self.tx, self.schedule = optimizer_for(config, self.model)
        self.state = abstract_state(self.model, self.tx, self.mesh, config.train.state_sharding)
        self._train: dict[int, StepPlan] = {}

    @property
    def chips(self) -> int:
        return self.mesh.devices.size

    def train(self, global_batch: int) -> StepPlan:
        """The train step at `global_batch` (a multiple of the chips), compiled once per batch."""
        if global_batch not in self._train:
            crop = self.config.data.crop_size
            batch_sharding = sharding.batch_sharding(self.mesh)
            batch = {
                "image": jax.ShapeDtypeStruct((global_batch, crop, crop, 3), jnp.float32,
                                              sharding=batch_sharding),
                "label": jax.ShapeDtypeStruct((global_batch, crop, crop), jnp.int32,
                                              sharding=batch_sharding),
            }
            key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(self.mesh))
            step = make_train_step(self.model, self.tx, self.schedule, self.config, self.mesh)
            self._train[global_batch] = compile_step(
                step, (self.state, batch, key), hbm_bytes=self.hbm_bytes,
                global_batch=global_batch, per_chip_batch=global_batch // self.chips)
        return self._train[global_batch]

    def eval_canvas(self) -> tuple[int, Mesh, int]:
        """(global batch, mesh, canvas side) of one evaluation step as `eval.padding` runs it:
        "fixed", eval.batch_size over the slice on data.eval_pad_size; "official", one image on
        one chip padded to the next size % output_stride == 1 (`augment.official_padded_size`)
        of data.eval_pad_size, the largest image."""
        side = self.config.data.eval_pad_size
        if predictors.padding_mode(self.config.eval) == "fixed":
            return self.config.eval.batch_size, self.mesh, side
        stride = self.config.model.output_stride
        return 1, Mesh(self.mesh.devices.flat[:1], (sharding.DATA_AXIS,)), (
            side + (stride + 1 - side % stride) % stride)

    def eval(self) -> StepPlan:
        """The evaluation step (`predictors.make_eval_step` of the config's predictor)."""
        batch_size, mesh, side = self.eval_canvas()
        predict = predictors.make_predictor(self.model, self.config.eval)
        step = predictors.make_eval_step(predict, self.num_classes, mesh)
        rows = sharding.batch_sharding(mesh)
        batch = {
            "image": jax.ShapeDtypeStruct((batch_size, side, side, 3), jnp.float32, sharding=rows),
            "label": jax.ShapeDtypeStruct((batch_size, side, side), jnp.int32, sharding=rows),
            "height": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=rows),
            "width": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=rows),
        }
        variables = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.replicated(mesh)),
            self.state.variables)
        return compile_step(step, (variables, batch), hbm_bytes=self.hbm_bytes,
                            global_batch=batch_size,
                            per_chip_batch=batch_size // mesh.devices.size)

    def dense_flops_per_image(self, side: int) -> float:
        """`models.report`'s dense conv count of the inference forward of one side x side image,
        in XLA's FLOPs (multiply-adds x report.flops_per_multiply_add())."""
        images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
        variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                 self.state.variables)
        macs = report.conv_macs(
            lambda v, x: self.model.apply(v, x, train=False)["logits"], variables, images)
        return macs * report.flops_per_multiply_add()

    def largest_fitting_batch(self, known: dict[int, bool]) -> tuple[int | None, int]:
        """(the largest global batch whose train step fits, compiles it took), by bisection
        over per-chip batches (doubling first while the largest known fits). None: not even
        one image per chip fits."""
        compiles = 0

        def fits(per_chip: int) -> bool:
            nonlocal compiles
            batch = per_chip * self.chips
            if batch not in known:
                compiles += 1
                known[batch] = self.train(batch).fits
            return known[batch]

        good = max((b // self.chips for b, ok in known.items() if ok), default=0)
        bad = min((b // self.chips for b, ok in known.items() if not ok), default=None)
        while bad is None:  # double until it does not fit
            probe = max(1, 2 * good)
            if probe > MAX_PER_CHIP_BATCH:
                return good * self.chips, compiles
            if fits(probe):
                good = probe
            else:
                bad = probe
        while bad - good > 1:
            probe = (good + bad) // 2
            good, bad = (probe, bad) if fits(probe) else (good, probe)
        return (good * self.chips if good else None), compiles


# ---------------------------------------------------------------------------------------------
# Multi-host: what each host feeds, and the reductions over the slice.


def process_shares(mesh: Mesh, global_batch: int) -> dict[int, tuple[int, int]]:
    """process index -> (rows of the global batch its input pipeline feeds,
    `sharding.per_process_batch_size`; rows its chips hold under the batch sharding)."""
    shape = (global_batch,)
    indices = sharding.batch_sharding(mesh).devices_indices_map(shape)
    held: dict[int, set[int]] = {}
    for device, index in indices.items():
        rows = range(*index[0].indices(global_batch))
        held.setdefault(device.process_index, set()).update(rows)
    return {p: (sharding.per_process_batch_size(global_batch, mesh, process_index=p),
                len(rows)) for p, rows in sorted(held.items())}


def slice_reductions(plan: StepPlan, chips: int) -> dict[str, tuple[int, int]]:
    """name (BATCH_STAT_OPS) -> (reductions found in the compiled train step, how many of them
    reach an all-reduce over all `chips`)."""
    out = {}
    for name, pattern in BATCH_STAT_OPS.items():
        found = compiled_hlo.all_reduced_over(plan.hlo, pattern, chips)
        out[name] = (len(found), sum(found.values()))
    return out


# ---------------------------------------------------------------------------------------------
# The report.


def _gib(n: float | None) -> str:
    """Bytes in GiB, or MiB below 0.1 GiB; "-" for None (a step the compiler refused)."""
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if abs(n) >= 0.1 * GIB else f"{n / 2**20:.1f} MiB"


def _flops(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} "


def format_plan(result: dict[str, Any], train: StepPlan, evaluation: StepPlan | None,
                extra: dict[str, Any]) -> str:
    """The plan as text: slice, memory per chip, FLOPs, collectives, checks, compile times
    (evaluation None: --train_only)."""
    hbm = result["hbm_bytes_per_chip"]
    steps = [("train", train, extra["dense_train"])]
    if evaluation is not None:
        steps.append(("eval", evaluation, extra["dense_eval"]))
    lines = [
        f"{extra['config']} on {result['topology']} ({extra['device_kind']}): "
        f"{result['chips']} chips, {result['hosts']} host{'s' * (result['hosts'] > 1)}, "
        f"{_gib(hbm)} HBM per chip{extra['hbm_note']}.",
        ("Figures of the TPU compiler (libtpu's buffer assignment, cost analysis and optimised "
         "HLO), per chip; not measurements." if not extra.get("gpu") else
         "Figures of XLA's GPU compiler (JAX's CUDA plugin, no GPU: no autotuning, no Triton "
         "GEMMs, no cost analysis), per GPU; not measurements."),
        f"train step: global batch {train.global_batch}, {train.per_chip_batch} per chip, "
        f"crop {extra['crop']}x{extra['crop']}.",
        "eval step:  not compiled (--train_only)." if evaluation is None else
        f"eval step:  global batch {evaluation.global_batch}, {evaluation.per_chip_batch} per "
        f"chip, canvas {extra['canvas']}x{extra['canvas']} ({extra['padding']} padding, "
        f"{extra['eval_mode']}).",
        "",
        f"{'HBM per chip':<12}" + "".join(f"{h:>13}" for h in (
            "arguments", "outputs", "temporaries", "total", "headroom", "fits")),
    ]
    for name, p, _ in steps:
        headroom = None if p.total_bytes is None else hbm - p.total_bytes
        lines.append(f"{name + ' step':<12}" + "".join(f"{c:>13}" for c in (
            _gib(p.argument_bytes), _gib(p.output_bytes), _gib(p.temp_bytes),
            _gib(p.total_bytes), _gib(headroom), "yes" if p.fits else "NO")))
    lines += ["(total = arguments + outputs + temporaries - donated buffers reused as outputs)", ""]
    for name, p, d in steps:
        if p.refused:
            lines.append(f"The compiler refused the {name} step: {p.refused}")
            continue
        if p.flops_per_step is None:
            lines.append(f"FLOPs, {name} step: not given by this compiler; models.report's "
                         f"dense conv count of one forward at that size: {_flops(d)}FLOPs.")
            continue
        per_image = p.flops_per_step / max(p.per_chip_batch, 1)
        lines.append(
            f"FLOPs, {name} step: {_flops(p.flops_per_step)}FLOPs per chip per step, "
            f"{_flops(per_image)}FLOPs per image; models.report's dense conv count of one "
            f"forward at that size: {_flops(d)}FLOPs ({per_image / d:.2f}x).")
    lines.append("")
    for name, p, _ in steps:
        if p.refused:  # no HLO: the compiler refused it (above)
            continue
        parts = [f"{k} {v.count} ({_gib(v.bytes)})" for k, v in p.collectives.items()]
        lines.append(f"Collectives per {name} step, per chip: {', '.join(parts) or 'none'}.")
    if "process_shares" in extra:
        shares, ok = extra["process_shares"], result["input"]["matches_sharding"]
        lines.append(
            f"Input pipeline: each of the {len(shares)} hosts feeds "
            f"{shares[0][0]} of the global batch's {train.global_batch} images, the rows its "
            f"chips hold: {'matches' if ok else 'MISMATCH (fed, held) ' + str(shares)}.")
    for name, (found, reduced) in extra.get("reductions", {}).items():
        lines.append(f"{name}: {reduced} of {found} forward reductions all-reduced over the "
                     f"{result['chips']} chips{'' if reduced == found and found else ' (CHECK)'}.")
    lines.append("Compile time on this machine: " + ", ".join(
        f"{name} {p.compile_s:.1f} s" for name, p, _ in steps) + ".")
    if result["max_global_batch"] is not None:
        probes = ", ".join(f"{b} {'fits' if ok else 'does not'}"
                           for b, ok in sorted(result["batches_compiled"].items()))
        lines.append(f"Largest global batch whose train step fits: {result['max_global_batch']} "
                     f"({result['max_global_batch'] // result['chips']} per chip; compiled: "
                     f"{probes}).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The program.


def parse_any_topology(name: str) -> tpu_topology.Topology | gpu_topology.GpuTopology:
    """A Cloud TPU slice ("v5e:2x4") or a GPU host ("h100:8", gpu_topology)."""
    if gpu_topology.is_gpu_topology(name):
        return gpu_topology.parse_gpu_topology(name)
    return tpu_topology.parse_topology(name)


def plan(config: ml_collections.ConfigDict, topology_name: str, *, max_batch: bool = False,
         hbm_gib: float | None = None, train_only: bool = False,
         log: Callable[[str], None] = lambda s: None) -> tuple[dict[str, Any], str]:
    """(the JSON result, the text report) of `config` on `topology_name`; `hbm_gib`: plan
    against this much HBM per chip instead of the chip's; train_only: no eval step (its JSON
    entry is null).

    Raises:
      tpu_topology.UnknownTopologyError, tpu_topology.LibtpuMissingError,
      gpu_topology.UnknownGpuTopologyError, gpu_topology.CudaPluginMissingError,
      config_check.ConfigError (e.g. a batch that does not divide over the chips): before any
      compile.
    """
    topology = parse_any_topology(topology_name)
    if hbm_gib is not None and not hbm_gib > 0:
        raise BadFlagError(f"--hbm_gib={hbm_gib}: pass a positive number of GiB per chip.")
    hbm = topology.hbm_bytes_per_chip if hbm_gib is None else round(hbm_gib * GIB)
    config_check.check(config, datasets=datasets.registry(), num_devices=topology.chips)
    if isinstance(topology, gpu_topology.GpuTopology):
        devices = gpu_topology.compile_only_devices(topology)
    else:
        devices = tpu_topology.compile_only_devices(topology)
    planner = Planner(config, topology, devices, hbm)
    log(f"Compiling the train step for {topology.name}...")
    train = planner.train(config.train.batch_size)
    evaluation = None
    if not train_only:
        log("Compiling the eval step...")
        evaluation = planner.eval()
    max_global, probes = None, {train.global_batch: train.fits}
    if max_batch:
        log("Searching the largest global batch that fits (one compile per probe)...")
        max_global, _ = planner.largest_fitting_batch(probes)
    result = {
        "topology": topology.name, "chips": topology.chips, "hosts": topology.hosts,
        "global_batch": train.global_batch, "per_chip_batch": train.per_chip_batch,
        "hbm_bytes_per_chip": hbm,
        "train": train.json(), "eval": evaluation and evaluation.json(),
        "max_global_batch": max_global,
        "batches_compiled": probes,  # global batch -> fits: this batch and the search's probes
    }
    _, _, canvas = planner.eval_canvas()
    extra = {
        "config": cli.config_spec(sys.argv[1:]) or "config", "device_kind": devices[0].device_kind,
        "crop": config.data.crop_size, "canvas": canvas, "padding": config.eval.padding,
        "eval_mode": predictors.mode_name(config.eval),
        "dense_train": planner.dense_flops_per_image(config.data.crop_size),
        "dense_eval": planner.dense_flops_per_image(canvas),
        "chips_per_host": topology.chips // topology.hosts,
        "gpu": isinstance(topology, gpu_topology.GpuTopology),
        "hbm_note": "" if hbm_gib is None else (
            f" (--hbm_gib; the chip has {_gib(topology.hbm_bytes_per_chip)})"),
    }
    result["train"]["dense_flops_per_image"] = extra["dense_train"]
    if evaluation is not None:
        result["eval"]["dense_flops_per_image"] = extra["dense_eval"]
    shares = process_shares(planner.mesh, train.global_batch)
    expected = train.per_chip_batch * extra["chips_per_host"]
    result["input"] = {
        "per_process_batch": [fed for fed, _ in shares.values()],
        "matches_sharding": all(fed == held == expected for fed, held in shares.values()),
    }
    if topology.hosts > 1:
        extra["process_shares"] = shares
    if topology.chips > 1 and not train.refused:
        extra["reductions"] = slice_reductions(train, topology.chips)
        result["train"]["slice_reductions"] = {
            k: {"found": f, "all_reduced": r} for k, (f, r) in extra["reductions"].items()}
    text = format_plan(result, train, evaluation, extra)
    if not train.fits and not max_batch:
        result["max_global_batch"], _ = planner.largest_fitting_batch(probes)
    return result, text


def fit_error(result: dict[str, Any], config: ml_collections.ConfigDict) -> str | None:
    """The FATAL message when a step does not fit, else None."""
    hbm = result["hbm_bytes_per_chip"]
    train, evaluation = result["train"], result["eval"]
    where = f"on {result['topology']} ({_gib(hbm)} HBM per chip)"
    if not train["fits"]:
        best = result["max_global_batch"]
        fix = (f"the largest global batch that fits is {best}: pass "
               f"--config.train.batch_size={best}" if best else
               "not even one image per chip fits: use a chip with more HBM, "
               "--config.model.dtype=bfloat16, --config.model.remat=True or a smaller "
               "data.crop_size")
        return (f"train.batch_size={train['global_batch']} does not fit {where}: the train step "
                f"{_shortfall(train, hbm)}; {fix}.")
    if evaluation and not evaluation["fits"]:
        key = ("eval.batch_size" if config.eval.padding == "fixed" else "data.eval_pad_size")
        return f"The eval step does not fit {where}: it {_shortfall(evaluation, hbm)}; lower {key}."
    return None


def _shortfall(step: dict[str, Any], hbm: int) -> str:
    """What a step that does not fit needs (its JSON entry): the bytes, or the compiler's
    refusal."""
    if step["refused"]:
        return f"was refused by the compiler ({step['refused'].rstrip('.')})"
    return (f"needs {_gib(step['total_bytes'])} per chip, {_gib(step['total_bytes'] - hbm)} "
            "more")


def main(argv: list[str]) -> None:
    cli.no_extra_arguments(argv)
    f = flags.FLAGS
    if not f.topology:
        raise tpu_topology.UnknownTopologyError(
            f"Pass --topology, one of {', '.join(tpu_topology.KNOWN_TOPOLOGIES)}.")
    parse_any_topology(f.topology)  # before anything else: one FATAL line
    result, text = plan(f.config, f.topology, max_batch=f.max_batch, hbm_gib=f.hbm_gib,
                        train_only=f.train_only,
                        log=lambda s: print(s, file=sys.stderr, flush=True))
    print(text, flush=True)
    if f.json:
        with open(f.json, "w") as out:
            json.dump(result, out, indent=1)
            out.write("\n")
    if message := fit_error(result, f.config):
        raise DoesNotFitError(message)


def _define_flags() -> None:
    """Only when run as a program: importing this module defines no absl flags."""
    cli.define_config_flag("Config file, e.g. configs/voc.py.")
    flags.DEFINE_string("topology", None, "A Cloud TPU slice, e.g. v5e:2x4 (8 chips, one "
                        "host) or v5e:4x4 (16 chips, 4 hosts).")
    flags.DEFINE_bool("max_batch", False, "Also find the largest global batch whose train step "
                      "fits, by bisection over compiles.")
    flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
    flags.DEFINE_float("hbm_gib", None, "Plan against this much HBM per chip (GiB) instead "
                       "of the chip's, e.g. to keep a margin for the TPU runtime.")
    flags.DEFINE_bool("train_only", False, "Compile the train step only (sweeps over training "
                      "settings: half the compile time).")


if __name__ == "__main__":
    # Every device here is a compile-only TPU device; the host's own backend runs nothing but
    # this program's bookkeeping: the CPU (JAX_PLATFORMS, if set, wins). JAX's persistent
    # compilation cache cannot load executables of compile-only devices: off.
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_compilation_cache", False)
    cli.run(main, _define_flags)
