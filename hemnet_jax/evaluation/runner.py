"""What eval.py runs: restore once, evaluate at one T_eval or a sweep of them, report.

Metrics come from `validation.validate` (the code training's periodic validation uses) with the
predictor `config.eval` asks for (single scale, or multi-scale + flip). Process 0 prints the
results and writes them as JSON to `<run_dir>/eval/` (or `<output_dir>/eval/`), named by every
setting that changes the numbers (`result_file_name`); every process holds the same totals.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from hemnet_jax.evaluation import metrics, predictors, validation
from hemnet_jax.training import diagnostics, sharding, state
from hemnet_jax.training.input_pipeline import prepare_data


def parse_sweep(spec: str) -> list[int]:
    """"1,2,3" -> [1, 2, 3]; "" -> []. Raises ValueError naming a bad entry."""
    values = []
    for item in filter(None, (s.strip() for s in str(spec).split(","))):
        if not item.isdigit() or int(item) < 1:
            raise ValueError(
                f"eval.num_iters_sweep={spec!r}: {item!r} is not a positive integer "
                "(expected e.g. '1,2,3,4,6,8')."
            )
        values.append(int(item))
    return values


def evaluate(
    config: ml_collections.ConfigDict, *, workdir: str | None = None,
    checkpoint: str | None = None, mesh: Mesh | None = None, output_dir: str | None = None,
) -> dict[str, Any]:
    """Evaluates a checkpoint as `config.eval` says; prints, writes JSON and returns the report.

    Args:
      workdir, checkpoint: which checkpoint (see `state.locate_checkpoint`).
      output_dir: where `eval/` goes (default: `workdir`, else the checkpoint's run directory).
    Returns:
      The JSON report: {"checkpoint", "step", "dataset", "split", "mode", "scales", "flip",
      "num_iters_train", "max_batches", "results": [one per T_eval: {"num_iters", "miou",
      "pixel_accuracy", "per_class_iou": {class: IoU or None}, "num_pixels", "confusion",
      "diagnostics": {"bases/...": value} (with eval.basis_diagnostics)}],
      "json": the file written}.
    """
    mesh = sharding.create_mesh() if mesh is None else mesh
    sweep = parse_sweep(config.eval.num_iters_sweep)
    restored = state.restore_for_eval(config, workdir=workdir, checkpoint=checkpoint, mesh=mesh)
    prepare_data(config)  # after the checkpoint's recorded dataset was checked
    info, model = restored.info, restored.model
    t_train = config.model.num_iters
    iters = sweep or [config.eval.num_iters or t_train]
    mode = predictors.mode_name(config.eval)
    title = (
        f"{info.name} {config.data.eval_split or info.eval_split}, checkpoint {restored.path} "
        f"(step {restored.step}), {_describe_mode(config.eval)}"
        + (f", first {config.eval.max_batches} batches" if config.eval.max_batches else "")
    )

    results = []
    for t in iters:
        predictor = predictors.make_predictor(model, config.eval, num_iters=t)
        result = validation.validate(config, model, restored.variables, mesh, info.num_classes,
                                     predictor=predictor)
        results.append(_result_json(t, result, info.class_names))
        logging.info("T_eval=%d: mIoU %.2f%%, pixel accuracy %.2f%%.", t,
                     100 * result["miou"], 100 * result["pixel_accuracy"])
        if config.eval.basis_diagnostics:
            results[-1]["diagnostics"] = validation.basis_diagnostics(
                config, model, restored.variables, mesh, num_iters=t)

    if sweep:
        text = f"{title}: mIoU by T_eval\n" + format_sweep_table(results, t_train)
    else:
        text = (f"{title}, T_eval={iters[0]} (T_train={t_train}):\n"
                + metrics.format_table(result, info.class_names))
    text += "".join(f"\nT_eval={r['num_iters']}: {diagnostics.describe(r['diagnostics'])}"
                    for r in results if "diagnostics" in r)
    report = {
        "checkpoint": restored.path, "step": restored.step, "dataset": info.name,
        "split": config.data.eval_split or info.eval_split, "mode": mode,
        "scales": list(config.eval.scales) if config.eval.multi_scale else [1.0],
        "flip": bool(config.eval.multi_scale and config.eval.flip),
        "num_iters_train": t_train, "max_batches": config.eval.max_batches, "results": results,
    }
    name = result_file_name(restored.step, config.eval, iters, sweep=bool(sweep))
    path = os.path.join(output_dir or workdir or restored.run_dir, "eval", name)
    report["json"] = path
    if jax.process_index() == 0:
        print(text, flush=True)
        epath.Path(path).parent.mkdir(parents=True, exist_ok=True)  # local or gs://
        epath.Path(path).write_text(json.dumps(report, indent=1))
        print(f"Results written to {path}", flush=True)
    return report


def result_file_name(step: int, eval_config: ml_collections.ConfigDict, iters: list[int],
                     sweep: bool) -> str:
    """The JSON's name: every setting that changes the numbers, so that two settings never share
    a file: step, scales (with flip), T_eval (or the sweep), padding and a partial split.

    E.g. step3000_ss_T3.json, step3000_ms0.75-1-1.25_flip_T3.json, step3000_ss_T1-2-4.json,
    step3000_ss_T3_first2batches.json, step3000_ss_T3_padofficial.json (eval.padding
    "official"; "fixed" adds nothing).
    """
    parts = [f"step{step}"]
    if eval_config.multi_scale:
        parts.append("ms" + "-".join(f"{s:g}" for s in eval_config.scales))
        if eval_config.flip:
            parts.append("flip")
    else:
        parts.append("ss")
    parts.append("T" + "-".join(str(t) for t in iters) if sweep else f"T{iters[0]}")
    padding = eval_config.get("padding")
    if padding and padding != "fixed":
        parts.append(f"pad{padding}")
    if eval_config.max_batches:
        parts.append(f"first{eval_config.max_batches}batches")
    return "_".join(parts) + ".json"


def format_sweep_table(results: list[dict[str, Any]], t_train: int) -> str:
    """Table 2 of the paper: mIoU (and pixel accuracy) by T_eval; * marks T_train."""
    lines = ["T_eval  mIoU (%)  pixel acc. (%)", "-" * 30]
    for r in results:
        mark = "*" if r["num_iters"] == t_train else " "
        miou, accuracy = (f"{100 * v:.2f}" if v is not None else "-"
                          for v in (r["miou"], r["pixel_accuracy"]))
        lines.append(f"{r['num_iters']:>5}{mark}  {miou:>8}  {accuracy:>14}")
    lines.append(f"(* = T_train = {t_train})")
    return "\n".join(lines)


def _describe_mode(eval_config: ml_collections.ConfigDict) -> str:
    if not eval_config.multi_scale:
        return "single scale"
    scales = ", ".join(f"{s:g}" for s in eval_config.scales)
    return f"multi-scale ({scales})" + (" + flip" if eval_config.flip else "")


def _result_json(num_iters: int, result: dict[str, Any], class_names) -> dict[str, Any]:
    def number(x: float) -> float | None:  # JSON has no NaN: undefined IoUs are null
        return None if math.isnan(x) else float(x)

    return {
        "num_iters": num_iters,
        "miou": number(result["miou"]),
        "pixel_accuracy": number(result["pixel_accuracy"]),
        "per_class_iou": {n: number(v) for n, v in zip(class_names, result["per_class_iou"],
                                                       strict=True)},
        "num_pixels": result["num_pixels"],
        "confusion": np.asarray(result["confusion"]).tolist(),
    }
