"""mIoU of a model's variables over the evaluation split: the code both training's periodic
validation and eval.py run."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hemnet_jax.data import datasets, pipeline
from hemnet_jax.evaluation import metrics, predictors
from hemnet_jax.training import diagnostics, sharding
from hemnet_jax.training.input_pipeline import data_dirs


def eval_batches(
    config: ml_collections.ConfigDict, mesh: Mesh, padding: str | None = None
) -> tuple[Iterator, int]:
    """This process's share of the evaluation split (whole, padded images) and the batch count.

    padding (default `eval.padding`): "fixed", global batches of eval.batch_size on one canvas
    (data.eval_pad_size); "official", this process's images one at a time, each padded to the
    next size with size % model.output_stride == 1 (EMANet's eval.py)."""
    info = datasets.get_dataset_info(config.data.name)
    padding = predictors.padding_mode(config.eval) if padding is None else padding
    official = padding == "official"
    batch_size = sharding.per_process_batch_size(config.eval.batch_size, mesh)
    ds, num_batches = pipeline.make_eval_dataset(
        name=info.name,
        split=config.data.eval_split or info.eval_split,
        per_process_batch_size=1 if official else batch_size,
        pad_size=config.data.eval_pad_size,
        pad_stride=config.model.output_stride if official else None,
        **data_dirs(config),
    )
    if config.eval.max_batches:
        ds, num_batches = (
            ds.take(config.eval.max_batches),
            min(num_batches, config.eval.max_batches),
        )
    return ds.as_numpy_iterator(), num_batches


@functools.lru_cache(maxsize=8)
def _single_scale_eval_step(
    model, num_iters: int | None, num_classes: int, mesh: Mesh | None, masked: bool
):
    """One compiled evaluation step per (model, T_eval, mesh, masking), reused by periodic
    validation; mesh None: the official padding's per-image step."""
    predictor = predictors.single_scale_predictor(model, num_iters=num_iters, masked=masked)
    return predictors.make_eval_step(predictor, num_classes, mesh)


def validate(
    config: ml_collections.ConfigDict,
    model,
    variables,
    mesh: Mesh,
    num_classes: int,
    *,
    num_iters: int | None = None,
    predictor: predictors.Predictor | None = None,
) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU of `variables` on the evaluation split.

    predictor: default single scale at `num_iters` (T_eval; None: the model's T), masked as
    `eval.padding` says (`predictors.make_predictor`).
    With eval.padding "official", each process evaluates its own images one at a time on its
    first device (one compile per distinct padded shape); the matrices are summed over the
    processes at the end.
    Returns `metrics.segmentation_metrics` of the summed confusion, plus "confusion" [K, K].
    """
    official = predictors.padding_mode(config.eval) == "official"
    step_mesh = None if official else mesh
    if predictor is None:
        step = _single_scale_eval_step(model, num_iters, num_classes, step_mesh, not official)
    else:
        step = predictors.make_eval_step(predictor, num_classes, step_mesh)
    batches, _ = eval_batches(config, mesh)
    if official:
        variables = jax.device_put(_host_copy(variables), jax.local_devices()[0])
        confusion = predictors.accumulate_confusion(step, variables, batches, None, num_classes)
        confusion = predictors.sum_over_processes(confusion)
    else:
        confusion = predictors.accumulate_confusion(step, variables, batches, mesh, num_classes)
    result = metrics.segmentation_metrics(confusion)
    result["confusion"] = confusion
    return result


def basis_diagnostics(
    config: ml_collections.ConfigDict,
    model,
    variables,
    mesh: Mesh,
    *,
    num_iters: int | None = None,
) -> dict[str, float]:
    """The basis diagnostics (`training.diagnostics.scalars`) of `variables`: the bases mu0,
    and the attention of the last HEM iteration at `num_iters` (T_eval) over every real pixel
    of the evaluation split (one more single-scale forward pass per batch)."""
    probe = _probe(model, num_iters, mesh)
    batches, _ = eval_batches(config, mesh, padding="fixed")  # one sharded canvas shape
    total = None
    for local in batches:
        batch = sharding.global_batch(local, mesh)
        total = diagnostics.add_stats(
            total, probe(variables, batch["image"], batch["height"], batch["width"]))
    return diagnostics.scalars(total)


@functools.lru_cache(maxsize=8)
def _probe(model, num_iters: int | None, mesh: Mesh) -> diagnostics.Probe:
    return diagnostics.make_probe(model, mesh, train=False, num_iters=num_iters)


def _host_copy(variables):
    """The whole value of every variable on this host, however it is sharded over processes."""
    if jax.process_count() == 1:
        return jax.device_get(variables)
    return multihost_utils.process_allgather(variables, tiled=True)
