"""The ablation program: cells and their arguments, the tables, and a real 2x2 ablation of tiny
runs (train.py per cell) interrupted by SIGTERM and resumed.

The end-to-end test runs `python -m hemnet_jax.studies.ablation` as users run it: a HEMNet
column (eta 0.5) and the EMANet column at T_train 1 and 2, 12 steps each. The first invocation
is stopped by SIGTERM during the second cell; the second invocation must skip the finished
cell, resume the interrupted one from its checkpoint, train the rest, evaluate all four and
write tables whose numbers are the evaluation JSONs'.
"""

import csv
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from hemnet_jax.studies import ablation, ablation_tables
from hemnet_jax.studies.ablation_tables import CellResult
from tests.test_train import _subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def _plan(root, *, grid=(), emanet=(), repeats=(), shared=(), t_eval="1,2", spec=None):
    return ablation.make_plan(str(root), spec or "configs/synthetic.py", list(shared),
                              list(grid), list(emanet), list(repeats), t_eval)


# ---------------------------------------------------------------------------------------------
# The plan: cells, names, the arguments train.py gets, the configs they make.


def test_plan_cells_names_arguments_and_configs(tmp_path):
    plan = _plan(tmp_path, grid=["model.step_size=0.2,0.5", "model.num_iters=1,3"],
                 emanet=["model.num_iters=1"],
                 repeats=["model.step_size=0.5 model.num_iters=3 seed=1",
                          "emanet model.num_iters=1 seed=2"],
                 shared=["--config.train.num_steps=7"])
    names = [c.name for c in plan.cells]
    assert names == [
        "hem_step_size=0.2_num_iters=1", "hem_step_size=0.2_num_iters=3",
        "hem_step_size=0.5_num_iters=1", "hem_step_size=0.5_num_iters=3",
        "emanet_num_iters=1",
        "hem_step_size=0.5_num_iters=3_seed=1", "emanet_num_iters=1_seed=2"]
    cells = dict(zip(names, plan.cells, strict=True))
    assert [c.column for c in plan.cells] == ["eta=0.2"] * 2 + ["eta=0.5"] * 2 + [
        "EMANet", "eta=0.5", "EMANet"]
    repeat = cells["hem_step_size=0.5_num_iters=3_seed=1"]
    assert repeat.repeat_of == "hem_step_size=0.5_num_iters=3"
    assert cells["emanet_num_iters=1_seed=2"].repeat_of == "emanet_num_iters=1"
    identity = ["--config", "configs/synthetic.py:emanet", "--config.train.num_steps=7",
                "--config.model.num_iters=1", "--config.seed=2"]
    assert plan.train_args(cells["emanet_num_iters=1_seed=2"]) == identity
    assert plan.launch_args(cells["emanet_num_iters=1_seed=2"]) == [  # what train.py is given
        *identity[:2], "--config.train.validate_at_end=False", *identity[2:]]
    assert plan.workdir(cells["emanet_num_iters=1"]) == str(tmp_path / "emanet_num_iters=1")

    hem = plan.configs["hem_step_size=0.2_num_iters=3"]
    m = hem.model
    assert (m.step_size, m.num_iters, hem.train.num_steps, hem.seed) == (0.2, 3, 7, 0)
    assert not hem.train.validate_at_end
    assert not hem.model.l2_normalize and not hem.model.stop_em_gradient
    em = plan.configs["emanet_num_iters=1_seed=2"]
    m = em.model
    assert (m.step_size, m.temperature, m.num_iters, em.seed) == (1.0, 1.0, 1, 2)
    assert em.model.l2_normalize and em.model.stop_em_gradient
    # The T_eval sweep always holds the cell's T_train.
    assert ablation.cell_sweep(plan, cells["hem_step_size=0.2_num_iters=3"]) == [1, 2, 3]
    # A variant already in the spec is kept: `voc.py:r50_os16` -> `voc.py:r50_os16,emanet`.
    assert cells["emanet_num_iters=1"].config_spec("configs/voc.py:r50_os16") == (
        "configs/voc.py:r50_os16,emanet")


@pytest.mark.parametrize("kwargs, message", [
    (dict(grid=["model.num_iter=1,2"]), "has no key 'num_iter'. Did you mean num_iters"),
    (dict(grid=["model.num_iters"]), "expected KEY=V1,V2"),
    (dict(grid=["model.num_iters=1,1"]), "a value is repeated"),
    (dict(grid=["model.num_iters=1,x"]), "bad config arguments"),
    (dict(grid=["model.num_iters=1,2"], shared=["--config.model.num_iters=3"]),
     "both a --config override and a key of the grid"),
    (dict(grid=["model.num_iters=1,2"], repeats=["model.num_iters=3 seed=1"]),
     "one of the grid's values"),
    (dict(grid=["model.num_iters=1,2"], repeats=["model.num_iters=2"]), "at least one key"),
    (dict(grid=["model.num_iters=1,2"], repeats=["emanet model.num_iters=2 seed=1"]),
     "no --emanet grid"),
    (dict(grid=["model.num_iters=1,2"], t_eval="1,0"), "--t_eval"),
    (dict(), "Nothing to do"),
])
def test_mistakes_are_named_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(ablation.UserError, match=re.escape(message)):
        _plan(tmp_path, **kwargs)
    assert not os.listdir(tmp_path)


def test_a_cell_started_with_other_arguments_is_refused(tmp_path):
    plan = _plan(tmp_path, grid=["model.num_iters=1"], shared=["--config.train.num_steps=5"])
    (cell,) = plan.cells
    os.makedirs(plan.workdir(cell))
    with open(os.path.join(plan.workdir(cell), "cell.json"), "w") as f:
        json.dump({"train_args": plan.train_args(cell)}, f)
    ablation.check_root(plan)  # the same arguments: fine
    other = _plan(tmp_path, grid=["model.num_iters=1"], shared=["--config.train.num_steps=6"])
    with pytest.raises(ablation.UserError, match="was started with the arguments"):
        ablation.check_root(other)


def test_shard_takes_every_nth_cell():
    assert ablation.parse_shard("") == (0, 1)
    assert ablation.parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "1", "a/2", "-1/2"):
        with pytest.raises(ablation.UserError, match="--shard"):
            ablation.parse_shard(bad)


def test_a_mistake_on_the_command_line_is_one_fatal_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hemnet_jax.studies.ablation", "--config", "configs/synthetic.py",
         "--root", str(tmp_path / "root"), "--grid", "model.step_sise=0.1,0.2"],
        capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("FATAL: cell hem_step_sise=0.1: Unknown config key"), lines[-3:]
    assert "Did you mean step_size" in lines[-1] and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "root")


def test_cell_results_read_the_evaluation_and_its_diagnostics(tmp_path):
    """The tables' row of a cell: mIoU by T_eval and the diagnostics at T_eval = T_train from
    the eval JSON at the final step; a sweep that misses a T_eval is not a result."""
    plan = _plan(tmp_path, grid=["model.num_iters=3"], shared=["--config.train.num_steps=5"],
                 t_eval="1,6")
    (cell,) = plan.cells
    path = ablation.eval_json_path(plan, cell, 5)
    os.makedirs(os.path.dirname(path))
    results = [{"num_iters": t, "miou": m, "diagnostics": {"bases/distinct_bases": d}}
               for t, m, d in ((1, 0.2, 7.0), (3, 0.3, 2.0), (6, 0.25, 1.0))]
    report = {"step": 5, "num_iters_train": 3, "results": results}
    with open(path, "w") as f:
        json.dump({**report, "results": results[:2]}, f)
    assert ablation.cell_result(plan, cell) is None  # T_eval 6 missing: evaluate again
    with open(path, "w") as f:
        json.dump(report, f)
    with open(os.path.join(plan.workdir(cell), "train_runs.jsonl"), "w") as f:
        f.write('{"wall_s": 10.5}\n{"wall_s": 4.5}\n')
    got = ablation.cell_result(plan, cell)
    assert got.sweep == {1: 0.2, 3: 0.3, 6: 0.25} and got.miou == 0.3
    assert got.diagnostics == {"bases/distinct_bases": 2.0}
    assert (got.train_s, got.eval_s, got.column, got.t_train) == (15.0, None, "HEMNet", 3)


# ---------------------------------------------------------------------------------------------
# The tables from planted results.


def _planted() -> list[CellResult]:
    """eta 0.2 peaks at T_train 3, eta 0.8 at T_train 1 (tie with 3: the smaller T wins),
    EMANet has only T_train 1 and 3; one repeat of (eta 0.2, T 3)."""
    def r(name, column, t, sweep, repeat_of=None, diag=None):
        return CellResult(name=name, column=column, t_train=t, sweep=sweep, repeat_of=repeat_of,
                          step=10, diagnostics=diag or {}, train_s=5.0, eval_s=1.0)

    return [
        r("a1", "eta=0.2", 1, {1: 0.50, 2: 0.51, 3: 0.49}),
        r("a3", "eta=0.2", 3, {1: 0.40, 2: 0.55, 3: 0.60}, diag={"distinct_bases": 3.0}),
        r("b1", "eta=0.8", 1, {1: 0.70, 2: 0.72, 3: 0.71}),
        r("b3", "eta=0.8", 3, {1: 0.60, 2: 0.65, 3: 0.70}),
        r("e1", "EMANet", 1, {1: 0.30, 2: None, 3: 0.35}),
        r("e3", "EMANet", 3, {1: 0.20, 2: 0.25, 3: None}),
        r("a3s1", "eta=0.2", 3, {1: 0.41, 2: 0.50, 3: 0.57}, repeat_of="a3"),
    ]


def test_tables_mark_the_best_t_train_and_t_eval(tmp_path):
    results = _planted()
    rows, cols, values, best = ablation_tables.table1(results)
    assert rows == [1, 3] and cols == ["eta=0.2", "eta=0.8", "EMANet"]
    assert values[(3, "eta=0.2")] == 0.60  # the grid cell, not its repeat (0.57)
    assert values[(3, "EMANet")] is None
    assert best == {"eta=0.2": 3, "eta=0.8": 1, "EMANet": 1}
    t_rows, heads, v2, best2 = ablation_tables.table2(results)
    assert t_rows == [1, 2, 3]
    assert heads == [("eta=0.2", 3), ("eta=0.8", 1), ("EMANet", 1)]
    assert [v2[(t, "eta=0.8")] for t in t_rows] == [0.70, 0.72, 0.71]
    assert best2 == {"eta=0.2": 3, "eta=0.8": 2, "EMANet": 3}
    ((name, runs, spread),) = ablation_tables.spread(results)
    assert name == "a3" and [r.name for r in runs] == ["a3", "a3s1"]
    assert spread == pytest.approx(0.03)

    paths = ablation_tables.write_tables(results, str(tmp_path))
    with open(paths["table1"]) as f:
        table1 = list(csv.DictReader(f))
    assert {(r["column"], int(r["T_train"])): (r["miou"], r["best_T_train"]) for r in table1} == {
        ("eta=0.2", 1): ("50.0000", "0"), ("eta=0.2", 3): ("60.0000", "1"),
        ("eta=0.8", 1): ("70.0000", "1"), ("eta=0.8", 3): ("70.0000", "0"),
        ("EMANet", 1): ("30.0000", "1"), ("EMANet", 3): ("", "0")}
    markdown = open(paths["markdown"]).read()
    assert "| 3 | **60.00** | 70.00 | - |" in markdown
    assert "| 2 | 55.00 | **72.00** | - |" in markdown  # Table 2's T_eval 2 row
    assert "| a3 | a3 60.00, a3s1 57.00 | 3.00 |" in markdown
    with open(paths["cells"]) as f:
        cells = {r["cell"]: r for r in csv.DictReader(f)}
    assert cells["a3"]["distinct_bases"] == "3.0" and cells["a1"]["distinct_bases"] == ""
    assert os.path.getsize(paths["heatmap"]) > 1000


# ---------------------------------------------------------------------------------------------
# A real ablation: 2 x 2 tiny runs, an interruption and a resume.


def _ablation_cmd(root, data_dir):
    return [
        sys.executable, "-m", "hemnet_jax.studies.ablation", "--config", "tests/tiny.py",
        "--root", str(root), "--grid", "model.step_size=0.5", "--grid", "model.num_iters=1,2",
        "--emanet", "model.num_iters=1,2", "--t_eval", "1,2",
        f"--config.data.data_dir={data_dir}", f"--config.train.num_steps={STEPS}",
        "--config.train.log_every=1", "--config.train.checkpoint_every=100",
        "--config.eval.max_batches=1", "--config.eval.basis_diagnostics=True",
    ]


def _env():
    return _subprocess_env(1)


def _train_invocations(workdir) -> int:
    with open(os.path.join(workdir, "train_runs.jsonl")) as f:
        return sum(1 for line in f if line.strip())


@pytest.mark.heavy(seconds=220)
def test_interrupted_ablation_resumes_and_tables_match_the_evaluations(tiny_data_dir, tmp_path):
    root = tmp_path / "ablation"
    names = ["hem_step_size=0.5_num_iters=1", "hem_step_size=0.5_num_iters=2",
             "emanet_num_iters=1", "emanet_num_iters=2"]
    first, second = (str(root / n) for n in names[:2])

    proc = subprocess.Popen(_ablation_cmd(root, tiny_data_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, env=_env())
    seen = []
    try:
        in_second = False
        for line in proc.stdout:
            seen.append(line)
            in_second |= f"{names[1]}: training" in line
            if in_second and re.search(r"(\] |^)\[2\] .*loss=", line):
                proc.send_signal(signal.SIGTERM)
                break
        seen.extend(proc.stdout)
        assert proc.wait(timeout=1500) == 0, "".join(seen[-30:])
    finally:
        proc.kill()
    output = "".join(seen)
    assert "ablation: stopped. Re-run the same command to resume." in output
    assert ablation.trained_step(first) == STEPS
    interrupted_at = ablation.trained_step(second)
    assert interrupted_at is not None and 2 <= interrupted_at < STEPS, output[-3000:]
    assert not os.path.exists(root / names[2]) and not os.path.exists(root / "tables")

    done = subprocess.run(_ablation_cmd(root, tiny_data_dir), capture_output=True, text=True,
                          cwd=REPO, env=_env(), timeout=1500)
    output = done.stdout + done.stderr
    runs = "".join(open(root / n / "train_runs.jsonl").read() for n in names
                   if os.path.exists(root / n / "train_runs.jsonl"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:] + runs
    assert f"{names[0]}: trained (step {STEPS}), skipped." in output
    assert _train_invocations(first) == 1  # not retrained
    assert _train_invocations(second) == 2
    assert f"Resumed from the checkpoint of step {interrupted_at}" in open(
        os.path.join(second, "train.log")).read()

    # Table 1 and Table 2 hold the evaluation JSONs' numbers.
    sweeps, diagnostics = {}, {}
    for name in names:
        assert ablation.trained_step(str(root / name)) == STEPS
        # eval.py's file name: step, single scale, the sweep, the partial split.
        with open(root / name / "eval" / f"step{STEPS}_ss_T1-2_first1batches.json") as f:
            report = json.load(f)
        assert report["step"] == STEPS
        sweeps[name] = {r["num_iters"]: r["miou"] for r in report["results"]}
        assert sorted(sweeps[name]) == [1, 2]
        t_train = report["num_iters_train"]
        (at_t_train,) = [r for r in report["results"] if r["num_iters"] == t_train]
        diagnostics[name] = at_t_train.get("diagnostics", {})
    columns = {"eta=0.5": names[:2], "EMANet": names[2:]}
    with open(root / "tables" / "table1.csv") as f:
        table1 = {(r["column"], int(r["T_train"])): r for r in csv.DictReader(f)}
    assert set(table1) == {(c, t) for c in columns for t in (1, 2)}
    best = {}
    for column, (t1, t2) in columns.items():
        for t, name in ((1, t1), (2, t2)):
            assert float(table1[(column, t)]["miou"]) == pytest.approx(100 * sweeps[name][t],
                                                                       abs=1e-3)
        best[column] = 1 if sweeps[t1][1] >= sweeps[t2][2] else 2
        for t in (1, 2):
            assert table1[(column, t)]["best_T_train"] == str(int(best[column] == t))
    with open(root / "tables" / "table2.csv") as f:
        table2 = list(csv.DictReader(f))
    for column, cells in columns.items():
        rows = [r for r in table2 if r["column"] == column]
        sweep = sweeps[cells[best[column] - 1]]
        assert [int(r["T_train"]) for r in rows] == [best[column]] * 2
        assert [float(r["miou"]) for r in rows] == pytest.approx(
            [100 * sweep[1], 100 * sweep[2]], abs=1e-3)
    # Each cell's basis diagnostics (eval's, at T_eval = T_train) are in cells.csv.
    with open(root / "tables" / "cells.csv") as f:
        cells = {r["cell"]: r for r in csv.DictReader(f)}
    for name in names:
        assert diagnostics[name], name  # eval.basis_diagnostics is on
        for key, value in diagnostics[name].items():
            assert float(cells[name][key]) == pytest.approx(value, rel=1e-9), (name, key)
    assert os.path.getsize(root / "tables" / "table1.png") > 1000
    assert "## Table 1" in open(root / "tables" / "ablation.md").read()


# ---------------------------------------------------------------------------------------------
# Work of earlier releases: tests/data/old_release (made by make.sh there).

OLD_RELEASE = os.path.join(REPO, "tests", "data", "old_release")
OLD_ARGS = ["--emanet", "model.num_iters=2", "--t_eval", "2", "--config.train.num_steps=2",
            "--config.train.log_every=1", "--config.eval.max_batches=1",
            "--config.model.base_width=2", "--config.model.head_channels=8",
            "--config.model.head_mid_channels=8"]
OLD_CELL = "emanet_num_iters=2"


@pytest.mark.heavy(seconds=70)
def test_work_of_earlier_releases_stays_usable(tiny_data_dir, tmp_path):
    """An ablation root of release 7d7cdb5 (its cell.json without the launch-only
    --config.train.validate_at_end=False) and the cell.json release 6de883d writes (with it) are
    both accepted; the root's EMANet checkpoint, written before model.freeze_unit_conv_in
    existed, evaluates under `:emanet` to the numbers the old release recorded, and resuming it
    for training ends in one FATAL line whose advice works."""
    root = tmp_path / "root"
    shutil.copytree(os.path.join(OLD_RELEASE, "ablation"), root)
    cell = root / OLD_CELL
    command = [sys.executable, "-m", "hemnet_jax.studies.ablation", "--config", "tests/tiny.py",
               "--root", str(root), *OLD_ARGS]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_env(),
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{OLD_CELL}: trained (step 2), skipped." in done.stdout
    assert "evaluating" not in done.stdout and (root / "tables" / "table1.csv").is_file()
    assert _train_invocations(cell) == 1  # nothing trained again
    shutil.copy(os.path.join(OLD_RELEASE, "cell_6de883d.json"), cell / "cell.json")
    ablation.check_root(ablation.make_plan(
        str(root), "tests/tiny.py", [a for a in OLD_ARGS if a.startswith("--config.")], [],
        ["model.num_iters=2"], [], "2"))

    model = [a for a in OLD_ARGS if a.startswith("--config.model.")]
    data = [f"--config.data.data_dir={tiny_data_dir}", "--config.eval.max_batches=1"]
    evaluated = subprocess.run(
        [sys.executable, os.path.join(REPO, "eval.py"), "--config", "tests/tiny.py:emanet",
         f"--checkpoint={cell}/checkpoints/2", f"--output_dir={tmp_path}", *model, *data],
        capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (old_json,) = glob.glob(f"{cell}/eval/step2_*.json")
    (new_json,) = glob.glob(f"{tmp_path}/eval/step2_*.json")
    with open(old_json) as f, open(new_json) as g:
        old, new = json.load(f), json.load(g)
    (old_result,) = [r for r in old["results"] if r["num_iters"] == 2]
    assert new["step"] == 2 and new["results"][0]["miou"] == pytest.approx(old_result["miou"])

    workdir = tmp_path / "resume"
    shutil.copytree(cell, workdir)
    train = [sys.executable, os.path.join(REPO, "train.py"), "--config", "tests/tiny.py:emanet",
             "--workdir", str(workdir), "--config.train.num_steps=3", *model, *data]
    refused = subprocess.run(train, capture_output=True, text=True, cwd=REPO, env=_env(),
                             timeout=600)
    fatal = [x for x in refused.stderr.splitlines() if x.startswith("FATAL:")]
    assert refused.returncode == 1 and len(fatal) == 1, refused.stderr[-3000:]
    assert "add --config.model.freeze_unit_conv_in=False to continue it" in fatal[0], fatal
    assert "Traceback" not in refused.stderr
    resumed = subprocess.run([*train, "--config.model.freeze_unit_conv_in=False"],
                             capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from the checkpoint of step 2" in resumed.stderr
