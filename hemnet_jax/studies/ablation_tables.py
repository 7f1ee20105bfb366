"""The ablation's tables from its cells' evaluation results: the paper's Table 1 (mIoU by
T_train and eta, EMANet as the rightmost column, the best T_train of each column marked) and
Table 2 (mIoU by T_eval at each column's best T_train, the best T_eval marked), the run-to-run
spread of repeated cells, and one row per cell (mIoU, basis diagnostics, wall time).

Pure functions of `CellResult`s; `write_tables` writes them as Markdown and CSV, and Table 1 as
a heat-map PNG (`figures.plot_table1`).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

from hemnet_jax.studies import figures

EMANET = "EMANet"


@dataclasses.dataclass(frozen=True)
class CellResult:
    """One trained and evaluated cell.

    name: the cell's directory name. column: its Table 1 column (e.g. "eta=0.2", "EMANet").
    t_train: its T_train. repeat_of: for a repeat (e.g. another seed), the name of the grid
    cell it repeats, else None. sweep: mIoU (fraction, None if undefined) by T_eval.
    diagnostics: basis diagnostics (name -> value). train_s / eval_s: wall seconds spent.
    """

    name: str
    column: str
    t_train: int
    sweep: Mapping[int, float | None]
    repeat_of: str | None = None
    step: int = 0
    diagnostics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    train_s: float | None = None
    eval_s: float | None = None

    @property
    def miou(self) -> float | None:
        """mIoU at T_eval = T_train (the number of Table 1)."""
        return self.sweep.get(self.t_train)


def _grid(results: Sequence[CellResult]) -> list[CellResult]:
    return [r for r in results if r.repeat_of is None]


def columns(results: Sequence[CellResult]) -> list[str]:
    """Table 1's columns in order of first appearance, EMANet columns last."""
    seen = list(dict.fromkeys(r.column for r in _grid(results)))
    return [c for c in seen if not c.startswith(EMANET)] + [c for c in seen if c.startswith(EMANET)]


def table1(results: Sequence[CellResult]) -> tuple[list[int], list[str], dict, dict[str, int]]:
    """(T_train rows, columns, {(T_train, column): mIoU or None}, {column: best T_train}).

    The best T_train of a column has the highest mIoU (the smaller T on a tie); a column whose
    cells all lack an mIoU has none.
    """
    grid = _grid(results)
    rows = sorted({r.t_train for r in grid})
    cols = columns(results)
    values = {(r.t_train, r.column): r.miou for r in grid}
    best = {}
    for c in cols:
        scored = [(t, values[(t, c)]) for t in rows if values.get((t, c)) is not None]
        if scored:
            best[c] = max(scored, key=lambda tv: (tv[1], -tv[0]))[0]
    return rows, cols, values, best


def table2(results: Sequence[CellResult]) -> tuple[list[int], list[tuple[str, int]], dict,
                                                   dict[str, int]]:
    """(T_eval rows, [(column, its best T_train)], {(T_eval, column): mIoU or None},
    {column: best T_eval})."""
    _, cols, _, best_t = table1(results)
    by_cell = {(r.column, r.t_train): r for r in _grid(results)}
    heads = [(c, best_t[c]) for c in cols if c in best_t]
    rows = sorted({t for c, t in heads for t in by_cell[(c, t)].sweep})
    values, best = {}, {}
    for c, t in heads:
        sweep = by_cell[(c, t)].sweep
        for te in rows:
            values[(te, c)] = sweep.get(te)
        scored = [(te, v) for te, v in sweep.items() if v is not None]
        if scored:
            best[c] = max(scored, key=lambda tv: (tv[1], -tv[0]))[0]
    return rows, heads, values, best


def spread(results: Sequence[CellResult]) -> list[tuple[str, list[CellResult], float | None]]:
    """[(grid cell name, [that cell and its repeats], max - min of their mIoU)] for each grid
    cell that has repeats: the run-to-run spread."""
    by_name = {r.name: r for r in _grid(results)}
    groups: dict[str, list[CellResult]] = {}
    for r in results:
        if r.repeat_of is not None and r.repeat_of in by_name:
            groups.setdefault(r.repeat_of, [by_name[r.repeat_of]]).append(r)
    out = []
    for name, runs in groups.items():
        mious = [r.miou for r in runs if r.miou is not None]
        out.append((name, runs, max(mious) - min(mious) if len(mious) == len(runs) else None))
    return out


# ---------------------------------------------------------------------------------------------
# Text.


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _csv_pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.4f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def diagnostic_names(results: Sequence[CellResult]) -> list[str]:
    return list(dict.fromkeys(k for r in results for k in r.diagnostics))


def markdown(results: Sequence[CellResult], title: str = "Ablation") -> str:
    """Tables 1 and 2, the spread of repeats and the per-cell table, as one Markdown page."""
    rows, cols, values, best = table1(results)
    lines = [f"# {title}", "", "## Table 1: mIoU (%) by T_train (rows) and column; **bold**: "
             "the column's best T_train", ""]
    lines += _md_table(["T_train", *cols], [
        [str(t)] + [(f"**{_pct(values.get((t, c)))}**" if best.get(c) == t
                     else _pct(values.get((t, c)))) for c in cols] for t in rows])
    t_rows, heads, v2, best2 = table2(results)
    lines += ["", "## Table 2: mIoU (%) by T_eval (rows) at each column's best T_train; "
              "**bold**: the best T_eval", ""]
    lines += _md_table(["T_eval", *(f"{c} (T_train {t})" for c, t in heads)], [
        [str(te)] + [(f"**{_pct(v2.get((te, c)))}**" if best2.get(c) == te
                      else _pct(v2.get((te, c)))) for c, _ in heads] for te in t_rows])
    groups = spread(results)
    if groups:
        lines += ["", "## Run-to-run spread (repeats of a cell, e.g. other seeds)", ""]
        lines += _md_table(["cell", "runs: mIoU (%)", "spread (max - min, points)"], [
            [name, ", ".join(f"{r.name} {_pct(r.miou)}" for r in runs),
             "-" if s is None else f"{100 * s:.2f}"] for name, runs, s in groups])
    names = diagnostic_names(results)
    lines += ["", "## Cells", ""]
    lines += _md_table(
        ["cell", "column", "T_train", "step", "mIoU (%)", *names, "train (s)", "eval (s)"],
        [[r.name, r.column, str(r.t_train), str(r.step), _pct(r.miou),
          *(_number(r.diagnostics.get(k)) for k in names), _seconds(r.train_s),
          _seconds(r.eval_s)] for r in results])
    total = sum((r.train_s or 0.0) + (r.eval_s or 0.0) for r in results)
    lines += ["", f"Total wall time of the cells (training + evaluation): {total:.0f} s.", ""]
    return "\n".join(lines)


def _number(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _seconds(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def write_tables(results: Sequence[CellResult], out_dir: str,
                 title: str = "Ablation") -> dict[str, str]:
    """Writes ablation.md, table1.csv, table2.csv, spread.csv, cells.csv and table1.png into
    `out_dir`; returns {what: path}. CSV mIoU values are percent."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in [
        ("markdown", "ablation.md"), ("table1", "table1.csv"), ("table2", "table2.csv"),
        ("spread", "spread.csv"), ("cells", "cells.csv"), ("heatmap", "table1.png")]}
    with open(paths["markdown"], "w") as f:
        f.write(markdown(results, title))
    rows, cols, values, best = table1(results)
    _write_csv(paths["table1"], ["column", "T_train", "miou", "best_T_train"], [
        [c, t, _csv_pct(values.get((t, c))), int(best.get(c) == t)] for c in cols for t in rows
        if (t, c) in values])
    t_rows, heads, v2, best2 = table2(results)
    _write_csv(paths["table2"], ["column", "T_train", "T_eval", "miou", "best_T_eval"], [
        [c, t, te, _csv_pct(v2.get((te, c))), int(best2.get(c) == te)] for c, t in heads
        for te in t_rows if v2.get((te, c)) is not None])
    _write_csv(paths["spread"], ["cell", "run", "miou", "spread"], [
        [name, r.name, _csv_pct(r.miou), _csv_pct(s)] for name, runs, s in spread(results)
        for r in runs])
    names = diagnostic_names(results)
    _write_csv(paths["cells"], ["cell", "column", "T_train", "repeat_of", "step", "miou",
                                *names, "train_s", "eval_s"], [
        [r.name, r.column, r.t_train, r.repeat_of or "", r.step, _csv_pct(r.miou),
         *(r.diagnostics.get(k, "") for k in names),
         "" if r.train_s is None else f"{r.train_s:.1f}",
         "" if r.eval_s is None else f"{r.eval_s:.1f}"] for r in results])
    figures.plot_table1(rows, cols, values, best, paths["heatmap"])
    return paths


def _write_csv(path: str, header: Sequence[str], rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
