"""The paper's ablation (Tables 1-2) as one program: train a grid of cells, evaluate each with
a T_eval sweep, write the tables.

  python -m hemnet_jax.studies.ablation --config configs/voc.py:r50_os16 --root DIR \\
      --grid model.step_size=0.1,0.2,0.4,0.8 --grid model.num_iters=1,2,3,4,6 \\
      --emanet model.num_iters=1,2,3,4 [--t_eval 1,2,3,4,6,8,12,16] [--shard I/N] \\
      [--repeat 'model.step_size=0.2 model.num_iters=6 seed=1'] [--config.key=value ...]

Cells: the cartesian product of the `--grid` keys (HEMNet), the product of the `--emanet` keys
(the config's `emanet` variant: the EMANet column), and each `--repeat` (a grid cell again with
extra keys, e.g. another seed: the run-to-run spread). Each cell trains in DIR/NAME (e.g.
DIR/hem_step_size=0.2_num_iters=6) by `train.py` in a subprocess, with the config, the shared
`--config.*` overrides and the cell's own; DIR/NAME/cell.json records those arguments and
DIR/NAME/train.log the output. Re-running the same command skips finished cells, resumes an
interrupted one from its checkpoint, and evaluates only what has no results. SIGTERM (or
Ctrl-C) stops the running cell at a checkpoint. `--shard I/N` takes every N-th cell from the
I-th, for N machines sharing DIR.

After training, each cell is evaluated in this process (eval.py's code path,
`evaluation.runner.evaluate`) at every T_eval of the sweep and its T_train; the results go to
DIR/NAME/eval/ as eval.py writes them. When every cell has results, DIR/tables/ gets
ablation.md, table1.csv, table2.csv, spread.csv, cells.csv and table1.png (see
docs/ablation.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from hemnet_jax import cli, errors, storage
from hemnet_jax.evaluation import runner
from hemnet_jax.studies import ablation_tables
from hemnet_jax.studies.ablation_tables import EMANET, CellResult
from hemnet_jax.training import checkpointing, state

PROGRAM = "python -m hemnet_jax.studies.ablation"  # as named in one-line errors

TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "train.py")
DEFAULT_T_EVAL = "1,2,3,4,6,8,12,16"  # the paper's Table 2
LABELS = {"model.step_size": "eta"}  # column labels: readable names of grid keys
NUM_ITERS = "model.num_iters"
# Arguments train_cell gives train.py after `--config SPEC` that do not change what a cell
# trains: not part of its identity (cell.json), so that roots of other releases stay valid.
# train.py's final validation is off: the study evaluates each cell at every T_eval (a shared
# override, which comes after it, can turn it on).
LAUNCH_ONLY_ARGS = ("--config.train.validate_at_end=False",)


class UserError(errors.UserError, ValueError):
    """A mistake on the command line or in DIR: the program prints one FATAL line."""


# ---------------------------------------------------------------------------------------------
# The plan: which cells, with which arguments.


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run of the ablation.

    variant: "hem" (the config as given) or "emanet" (its `emanet` variant).
    overrides: ((config key, value as typed), ...): the grid keys first, then a repeat's extras.
    repeat_of: for a `--repeat`, the name of the grid cell it repeats.
    """

    variant: str
    overrides: tuple[tuple[str, str], ...]
    repeat_of: str | None = None
    num_grid_keys: int = 0  # how many of `overrides` are grid keys

    @property
    def name(self) -> str:
        parts = [f"{_short(k)}={v}" for k, v in self.overrides]
        return "_".join([self.variant, *parts])

    @property
    def column(self) -> str:
        """Table 1's column: the overrides other than T_train (and a repeat's extras)."""
        keys = {k: v for k, v in self.overrides[: self.num_grid_keys] if k != NUM_ITERS}
        label = ", ".join(f"{LABELS.get(k, _short(k))}={v}" for k, v in keys.items())
        if self.variant == "emanet":
            return f"{EMANET} {label}".strip() if label else EMANET
        return label or "HEMNet"

    def config_spec(self, spec: str) -> str:
        """The `--config` argument: `spec` itself or with the `emanet` variant added."""
        if self.variant != "emanet":
            return spec
        return f"{spec},emanet" if ":" in spec else f"{spec}:emanet"

    def train_args(self, spec: str, shared: Sequence[str]) -> list[str]:
        """train.py's arguments that make the cell (other than --workdir and LAUNCH_ONLY_ARGS)."""
        return ["--config", self.config_spec(spec), *shared,
                *(f"--config.{k}={v}" for k, v in self.overrides)]

    def launch_args(self, spec: str, shared: Sequence[str]) -> list[str]:
        """What train_cell gives train.py (other than --workdir): train_args with
        LAUNCH_ONLY_ARGS after `--config SPEC`."""
        args = self.train_args(spec, shared)
        return [*args[:2], *LAUNCH_ONLY_ARGS, *args[2:]]


def _short(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def parse_axes(specs: Sequence[str], flag: str) -> list[tuple[str, list[str]]]:
    """["model.num_iters=1,2,3", ...] -> [("model.num_iters", ["1", "2", "3"]), ...]."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not items:
            raise UserError(f"--{flag} {spec!r}: expected KEY=V1,V2,... "
                            "(e.g. --grid model.num_iters=1,2,3).")
        if key in dict(axes):
            raise UserError(f"--{flag}: key {key!r} given twice.")
        if len(set(items)) != len(items):
            raise UserError(f"--{flag} {spec!r}: a value is repeated.")
        axes.append((key, items))
    return axes


def grid_cells(variant: str, axes: Sequence[tuple[str, list[str]]]) -> list[Cell]:
    """The cartesian product of the axes, the last key varying fastest."""
    if not axes:
        return []
    keys = [k for k, _ in axes]
    return [Cell(variant, tuple(zip(keys, values, strict=True)), num_grid_keys=len(keys))
            for values in itertools.product(*(v for _, v in axes))]


def parse_repeat(spec: str, axes_by_variant: dict[str, list[tuple[str, list[str]]]]) -> Cell:
    """'[emanet] KEY=V KEY=V ...': a grid cell (every grid key given, with a value of the grid)
    plus at least one other key (e.g. seed=1)."""
    tokens = spec.split()
    variant = "emanet" if tokens and tokens[0] == "emanet" else "hem"
    tokens = tokens[1:] if variant == "emanet" else tokens
    axes = axes_by_variant[variant]
    if not axes:
        flag = "--emanet" if variant == "emanet" else "--grid"
        raise UserError(f"--repeat {spec!r}: there is no {flag} grid to repeat a cell of.")
    given: dict[str, str] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key or not value or key in given:
            raise UserError(f"--repeat {spec!r}: expected '[emanet] KEY=VALUE KEY=VALUE ...' "
                            "with each key once (e.g. 'model.num_iters=3 seed=1').")
        given[key] = value
    grid = []
    for key, values in axes:
        if given.get(key) not in values:
            raise UserError(f"--repeat {spec!r}: give {key} one of the grid's values "
                            f"({','.join(values)}).")
        grid.append((key, given.pop(key)))
    if not given:
        raise UserError(f"--repeat {spec!r}: name at least one key that differs from the grid "
                        "cell (e.g. seed=1).")
    base = Cell(variant, tuple(grid), num_grid_keys=len(grid))
    return Cell(variant, (*grid, *given.items()), repeat_of=base.name,
                num_grid_keys=len(grid))


def parse_shard(spec: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; '' -> (0, 1)."""
    if not spec:
        return 0, 1
    i, sep, n = spec.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise UserError(f"--shard {spec!r}: expected I/N with 0 <= I < N (e.g. 0/4).")
    return int(i), int(n)


def cell_config(args: Sequence[str]) -> ml_collections.ConfigDict:
    """The config train.py builds from `args` (the same absl config flag, parsed the same way)."""
    argv = ["train.py", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    return values.config


@dataclasses.dataclass(frozen=True)
class Plan:
    root: str
    spec: str
    shared: tuple[str, ...]
    cells: tuple[Cell, ...]
    configs: dict[str, ml_collections.ConfigDict]  # by cell name
    t_eval: tuple[int, ...]

    def workdir(self, cell: Cell) -> str:
        return os.path.join(self.root, cell.name)

    def train_args(self, cell: Cell) -> list[str]:
        return cell.train_args(self.spec, self.shared)

    def launch_args(self, cell: Cell) -> list[str]:
        return cell.launch_args(self.spec, self.shared)


def make_plan(root: str, spec: str, shared: Sequence[str], grid: Sequence[str],
              emanet: Sequence[str], repeats: Sequence[str], t_eval: str) -> Plan:
    """Checks every argument and every cell's config before any work; raises UserError."""
    axes = {"hem": parse_axes(grid, "grid"), "emanet": parse_axes(emanet, "emanet")}
    cells = [*grid_cells("hem", axes["hem"]), *grid_cells("emanet", axes["emanet"])]
    cells += [parse_repeat(r, axes) for r in repeats]
    if not cells:
        raise UserError("Nothing to do: give --grid KEY=V1,V2,... and/or --emanet KEY=V1,....")
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"Two cells share a name: {', '.join(twice)}.")
    for arg in shared:
        if not arg.startswith("--config.") or "=" not in arg:
            raise UserError(f"{arg!r}: write config overrides as --config.KEY=VALUE.")
    overridden = {a[len("--config."):].split("=", 1)[0] for a in shared}
    for cell in cells:
        clash = overridden & {k for k, _ in cell.overrides}
        if clash:
            raise UserError(f"{sorted(clash)[0]} is both a --config override and a key of the "
                            "grid; give it in one place.")
    try:
        sweep = runner.parse_sweep(t_eval)
    except ValueError as e:
        raise UserError(str(e).replace("eval.num_iters_sweep", "--t_eval")) from e
    if not sweep:
        raise UserError("--t_eval: give at least one T_eval (e.g. 1,2,3,4,6,8).")
    configs = {}
    for cell in cells:
        args = cell.launch_args(spec, shared)
        message = cli.unknown_override(args)
        if message:
            raise UserError(f"cell {cell.name}: {message}")
        try:
            configs[cell.name] = cell_config(args)
        except Exception as e:  # a value of the wrong type, a broken config file
            raise UserError(f"cell {cell.name}: bad config arguments {args}: {e}") from e
    return Plan(root, spec, tuple(shared), tuple(cells), configs, tuple(sweep))


def check_root(plan: Plan) -> None:
    """Every cell already in the root must have been started with the same arguments."""
    for cell in plan.cells:
        record = _read_json(os.path.join(plan.workdir(cell), "cell.json"))
        recorded = record and [a for a in record.get("train_args", []) if a not in LAUNCH_ONLY_ARGS]
        if record is not None and recorded != plan.train_args(cell):
            raise UserError(
                f"{plan.workdir(cell)}/cell.json: this cell was started with the arguments "
                f"{record.get('train_args')}, not {plan.train_args(cell)}. Re-run with the "
                "flags it was started with, or use another --root.")


# ---------------------------------------------------------------------------------------------
# Training: train.py in a subprocess per cell.


class _Stop:
    """SIGTERM / SIGINT: forwarded to the running train.py (which saves a checkpoint and exits);
    the program stops after it."""

    def __init__(self):
        self.requested = False
        self.child: subprocess.Popen | None = None

    def __call__(self, signum, frame) -> None:
        if not self.requested:
            print(f"ablation: signal {signum}: stopping after the running cell saves its "
                  "checkpoint.", file=sys.stderr, flush=True)
        self.requested = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def trained_step(workdir: str) -> int | None:
    """The latest checkpoint's step of a cell's workdir, or None."""
    try:
        directory, _ = state.locate_checkpoint(workdir)
    except state.CheckpointNotFoundError:
        return None
    ckpt = checkpointing.Checkpointer(directory, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def train_cell(plan: Plan, cell: Cell, stop: _Stop) -> int:
    """Runs train.py for `cell` (resuming from its checkpoint if any); returns its exit code.
    Its output goes to our stdout and to WORKDIR/train.log; each run is appended to
    WORKDIR/train_runs.jsonl (arguments, wall seconds, exit code)."""
    workdir, args = plan.workdir(cell), plan.train_args(cell)
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, "cell.json"), {
        "name": cell.name, "variant": cell.variant, "overrides": dict(cell.overrides),
        "repeat_of": cell.repeat_of, "train_args": args})
    start = time.time()
    with open(os.path.join(workdir, "train.log"), "a") as log:
        launch = plan.launch_args(cell)
        stop.child = subprocess.Popen(
            [sys.executable, TRAIN_PY, "--workdir", workdir, *launch],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        if stop.requested:  # a signal between the check and the start
            stop.child.send_signal(signal.SIGTERM)
        for line in stop.child.stdout:
            log.write(line)
            sys.stdout.write(line)
        code = stop.child.wait()
        sys.stdout.flush()
    stop.child = None
    with open(os.path.join(workdir, "train_runs.jsonl"), "a") as f:
        f.write(json.dumps({"train_args": launch, "wall_s": round(time.time() - start, 1),
                            "returncode": code, "end": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                     time.gmtime())}) + "\n")
    return code


# ---------------------------------------------------------------------------------------------
# Evaluation: eval.py's code path in this process, once training is over.


def eval_json_path(plan: Plan, cell: Cell, step: int) -> str:
    """Where eval.py's code writes the cell's sweep (`runner.result_file_name`)."""
    name = runner.result_file_name(step, plan.configs[cell.name].eval, cell_sweep(plan, cell),
                                   sweep=True)
    return os.path.join(plan.workdir(cell), "eval", name)


def cell_sweep(plan: Plan, cell: Cell) -> list[int]:
    """The T_eval sweep of a cell: --t_eval and the cell's T_train."""
    return sorted({*plan.t_eval, plan.configs[cell.name].model.num_iters})


def evaluation_of(plan: Plan, cell: Cell, step: int) -> dict[str, Any] | None:
    """The cell's evaluation JSON if it covers its whole sweep at `step`, else None."""
    report = _read_json(eval_json_path(plan, cell, step))
    if report is None or report.get("step") != step:
        return None
    if sorted(r["num_iters"] for r in report.get("results", [])) != cell_sweep(plan, cell):
        return None
    return report


def evaluate_cell(plan: Plan, cell: Cell) -> dict[str, Any]:
    """Evaluates the cell's latest checkpoint at its T_eval sweep (writes WORKDIR/eval/...)."""
    config = ml_collections.ConfigDict(plan.configs[cell.name].to_dict())
    config.eval.num_iters_sweep = ",".join(str(t) for t in cell_sweep(plan, cell))
    start = time.time()
    report = runner.evaluate(config, workdir=plan.workdir(cell))
    with open(os.path.join(plan.workdir(cell), "eval_runs.jsonl"), "a") as f:
        f.write(json.dumps({"json": report["json"], "wall_s": round(time.time() - start, 1)})
                + "\n")
    return report


def diagnostics_of(report: dict[str, Any]) -> dict[str, float]:
    """The basis diagnostics eval wrote beside the mIoU (at T_eval = T_train if per T_eval)."""
    t_train = report.get("num_iters_train")
    for r in report.get("results", []):
        if r.get("num_iters") == t_train and isinstance(r.get("diagnostics"), dict):
            return dict(r["diagnostics"])
    found = report.get("diagnostics")
    return dict(found) if isinstance(found, dict) else {}


def cell_result(plan: Plan, cell: Cell) -> CellResult | None:
    """The cell's row of the tables, or None while it is not trained and evaluated."""
    num_steps = plan.configs[cell.name].train.num_steps
    report = evaluation_of(plan, cell, num_steps)
    if report is None:
        return None
    workdir = plan.workdir(cell)
    return CellResult(
        name=cell.name, column=cell.column, t_train=plan.configs[cell.name].model.num_iters,
        sweep={r["num_iters"]: r["miou"] for r in report["results"]},
        repeat_of=cell.repeat_of, step=report["step"], diagnostics=diagnostics_of(report),
        train_s=_total_wall(os.path.join(workdir, "train_runs.jsonl")),
        eval_s=_total_wall(os.path.join(workdir, "eval_runs.jsonl")))


# ---------------------------------------------------------------------------------------------
# The program.


def run(plan: Plan, shard: tuple[int, int] = (0, 1)) -> int:
    """Trains and evaluates this shard's cells, then writes the tables if every cell is done.
    Returns the exit code: 0 (done, stopped by a signal, or waiting for other shards), 1 (a
    cell's training failed)."""
    mine = [c for i, c in enumerate(plan.cells) if i % shard[1] == shard[0]]
    stop = _Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    failed = []
    try:
        for i, cell in enumerate(mine, 1):
            num_steps = plan.configs[cell.name].train.num_steps
            step = trained_step(plan.workdir(cell))
            if step is not None and step >= num_steps:
                print(f"ablation: [{i}/{len(mine)}] {cell.name}: trained (step {step}), skipped.",
                      flush=True)
                continue
            if stop.requested:
                break
            what = "training" if step is None else f"resuming from step {step}"
            print(f"ablation: [{i}/{len(mine)}] {cell.name}: {what}.", flush=True)
            code = train_cell(plan, cell, stop)
            if stop.requested:
                break
            if code != 0 and (trained_step(plan.workdir(cell)) or 0) >= num_steps:
                print(f"ablation: {cell.name}: train.py exited with {code} after saving its "
                      f"final checkpoint (step {num_steps}); the cell counts as trained.",
                      flush=True)
            elif code != 0:
                failed.append(cell.name)
                print(f"ablation: {cell.name}: train.py exited with {code}; see "
                      f"{plan.workdir(cell)}/train.log. Going on with the next cell.", flush=True)
        if stop.requested:
            print("ablation: stopped. Re-run the same command to resume.", flush=True)
            return 0
        for cell in mine:
            if stop.requested:
                print("ablation: stopped. Re-run the same command to resume.", flush=True)
                return 0
            step = trained_step(plan.workdir(cell))
            num_steps = plan.configs[cell.name].train.num_steps
            if step is None or step < num_steps or evaluation_of(plan, cell, step) is not None:
                continue
            print(f"ablation: evaluating {cell.name} at T_eval {cell_sweep(plan, cell)}.",
                  flush=True)
            evaluate_cell(plan, cell)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    results = {c.name: cell_result(plan, c) for c in plan.cells}
    missing = [n for n, r in results.items() if r is None]
    if missing:
        print(f"ablation: tables wait for {len(missing)} cell(s) without results: "
              f"{', '.join(missing)}.", flush=True)
    else:
        out = os.path.join(plan.root, "tables")
        paths = ablation_tables.write_tables(list(results.values()), out,
                                             title=f"Ablation of {plan.spec}")
        with open(paths["markdown"]) as f:
            print(f.read(), flush=True)
        print(f"ablation: tables written to {out}/", flush=True)
    if failed:
        print(f"ablation: training failed for {', '.join(failed)}.", flush=True)
        return 1
    return 0


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: str, value: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def _total_wall(path: str) -> float | None:
    try:
        with open(path) as f:
            return sum(json.loads(line)["wall_s"] for line in f if line.strip())
    except FileNotFoundError:
        return None


def _shared_overrides(argv: Sequence[str]) -> list[str]:
    return [a for a in argv if a.startswith("--config.")]


def main(argv: Sequence[str]) -> None:
    """Checks everything (UserError: one FATAL line), then trains, evaluates, writes tables."""
    cli.no_extra_arguments(argv)
    f = flags.FLAGS
    cli.quiet_library_logs()
    spec = cli.config_spec(sys.argv[1:])
    if not spec:
        raise UserError("--config FILE[:variant] is required.")
    storage.require_local(PROGRAM, {"--root": f.root})
    plan = make_plan(os.path.abspath(f.root), spec, _shared_overrides(sys.argv[1:]), f.grid,
                     f.emanet, f.repeat, f.t_eval)
    shard = parse_shard(f.shard)
    check_root(plan)
    if not os.path.isfile(TRAIN_PY):
        raise UserError(f"{TRAIN_PY} not found: run the ablation from a checkout of "
                        "hemnet-jax (it starts train.py per cell).")
    logging.info("Ablation: %d cells in %s.", len(plan.cells), plan.root)
    sys.exit(run(plan, shard))


def _define_flags() -> None:
    cli.define_config_flag("A configs/*.py file (with :variant): the base of every cell.")
    flags.DEFINE_string("root", None, "Each cell trains in ROOT/NAME; the tables go to "
                        "ROOT/tables/.")
    flags.mark_flag_as_required("root")
    flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,...: a grid axis of HEMNet cells "
                              "(repeatable; the cells are the cartesian product).")
    flags.DEFINE_multi_string("emanet", [], "KEY=V1,V2,...: an axis of the EMANet column "
                              "(the config's `emanet` variant).")
    flags.DEFINE_multi_string("repeat", [], "'[emanet] KEY=V ... seed=S': a grid cell again "
                              "with extra keys (the run-to-run spread).")
    flags.DEFINE_string("t_eval", DEFAULT_T_EVAL, "The T_eval sweep of Table 2 (each cell's "
                        "T_train is added).")
    flags.DEFINE_string("shard", "", "I/N: this machine's share of the cells (every N-th from "
                        "the I-th).")


if __name__ == "__main__":
    cli.run(main, _define_flags)
