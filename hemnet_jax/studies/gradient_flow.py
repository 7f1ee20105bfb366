"""The gradient-flow study of Fig. 3 as a program: per-HEM-layer gradient magnitudes and the ELBO
per iteration, over a fixed set of training crops and several eta, at initialisation or from a
checkpoint; writes CSV, JSON and Fig. 3's four panels as PNG:

  python -m hemnet_jax.studies.gradient_flow --config configs/voc.py [--workdir DIR] \\
      [--output_dir DIR] [--config.study.num_images=100 ...]

The `jax.grad` functions it runs are `hemnet_jax.studies.layer_gradients` (re-exported here, so
`from hemnet_jax.studies import gradient_flow as gf; gf.per_layer_input_gradients(...)` works).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from etils import epath
from jax.sharding import Mesh

from hemnet_jax import cli, config_check, storage
from hemnet_jax.data import datasets, pipeline
from hemnet_jax.models import HEMNet, create_model
from hemnet_jax.studies.figures import plot_fig3
from hemnet_jax.studies.layer_gradients import (  # noqa: F401  (the library, re-exported)
    HEM_SCOPE,
    SUMMARY_KEYS,
    LayerGradients,
    Summary,
    elbo_sigma2,
    eq18_weights,
    layer_gradient_metrics,
    layer_input_gradients,
    model_layer_gradients,
    model_layer_input_gradients,
    per_layer_input_gradients,
    summarize,
    with_layer_gradients,
)
from hemnet_jax.training import checkpointing, sharding, state
from hemnet_jax.training.input_pipeline import data_dirs

PROGRAM = "python -m hemnet_jax.studies.gradient_flow"  # as named in one-line errors

# ---------------------------------------------------------------------------------------------
# The program: fixed training crops, several eta, at initialisation or from a checkpoint.


def fixed_training_crops(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The study's images: the first `study.num_images` crops of the training stream of seed
    `study.seed` (random scale, crop and flip as in training). {"image", "label"} numpy."""
    info = datasets.get_dataset_info(config.data.name)
    ds = pipeline.make_train_dataset(
        name=info.name,
        split=config.data.train_split or info.train_split,
        per_process_batch_size=config.study.num_images,
        crop_size=config.data.crop_size,
        scales=tuple(config.data.scales),
        seed=config.study.seed,
        shuffle_buffer=config.data.shuffle_buffer,
        process_index=0,
        process_count=1,
        **data_dirs(config),
    )
    batch = next(ds.as_numpy_iterator())
    return {"image": batch["image"], "label": batch["label"]}


def load_variables(
    config: ml_collections.ConfigDict, model: HEMNet, workdir: str | None, mesh: Mesh
) -> tuple[dict[str, Any], int]:
    """(variables, step): the checkpoint of step `study.checkpoint_step` (default: the latest)
    in <workdir>/checkpoints, or without one a fresh initialisation (seed, model.pretrained)."""
    directory = os.path.join(workdir, "checkpoints") if workdir else ""
    ckpt = None
    if directory and epath.Path(directory).is_dir():  # local or gs://
        ckpt = checkpointing.Checkpointer(directory, read_only=True)
    latest = None if ckpt is None else ckpt.latest_step()
    step = config.study.checkpoint_step
    if latest is None and step is not None:
        raise FileNotFoundError(f"study.checkpoint_step={step}, but no checkpoint in {workdir!r}.")
    tx, _ = state.optimizer_for(config, model)
    if latest is None:
        return state.init_state(config, model, tx, mesh).variables, 0
    restored, _ = ckpt.restore(state.abstract_state(model, tx, mesh), config, step)
    ckpt.close()
    return restored.variables, int(restored.step)


def run_study(
    config: ml_collections.ConfigDict,
    model: HEMNet,
    variables: Mapping[str, Any],
    batch: Mapping[str, np.ndarray],
    mesh: Mesh | None = None,
) -> list[dict[str, Any]]:
    """`model_layer_gradients` per eta of `study.step_sizes`, averaged over the images in
    batches of `study.batch_size` (sharded over `mesh` where it divides). Same weights for
    every eta. Returns one dict per eta: "eta" and the summary's keys as numpy."""
    study = config.study
    rng = jax.random.PRNGKey(study.seed)
    images, labels = batch["image"], batch["label"]
    results = []
    for eta in study.step_sizes:
        fn = jax.jit(functools.partial(
            model_layer_gradients, model.clone(hem=model.hem.clone(step_size=float(eta))),
            num_iters=study.num_iters, train=study.train_mode,
        ))
        sums: dict[str, np.ndarray] = {}
        for start in range(0, len(images), study.batch_size):
            chunk = (images[start:start + study.batch_size], labels[start:start + study.batch_size])
            if mesh is not None and len(chunk[0]) % mesh.devices.size == 0:
                chunk = jax.device_put(chunk, sharding.batch_sharding(mesh))
            out = jax.device_get(fn(variables, *chunk, rng=rng))
            for k in SUMMARY_KEYS:
                sums[k] = sums.get(k, 0.0) + len(chunk[0]) * np.asarray(out[k], np.float64)
        results.append({"eta": float(eta), **{k: v / len(images) for k, v in sums.items()}})
    return results


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per (eta, layer); `total` on each eta's first row."""
    header = (f"{'eta':>5} {'layer':>5} {'ELBO':>12} {'N-step |g|':>12} {'E-step |g|':>12} "
              f"{'eq.18 N-step':>12} {'total |g|':>12}")
    rows = [header, "-" * len(header)]
    for r in results:
        for t in range(len(r["n_step"])):
            total = f"{r['total']:12.4e}" if t == 0 else ""
            rows.append(
                f"{r['eta']:5.2f} {t + 1:5d} {r['elbo'][t]:12.5e} {r['n_step'][t]:12.4e} "
                f"{r['e_step'][t]:12.4e} {r['predicted'][t]:12.4e} {total}".rstrip()
            )
    return "\n".join(rows)


def write_results(
    results: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], output_dir: str
) -> dict[str, str]:
    """gradient_flow.csv (one row per eta and layer), gradient_flow.json (meta and results) and
    gradient_flow.png (Fig. 3) in `output_dir`. Returns their paths by format."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {e: os.path.join(output_dir, f"gradient_flow.{e}") for e in ("csv", "json", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["eta", "layer", "elbo", "n_step_grad", "e_step_grad",
                         "predicted_n_step_grad", "total_grad"])
        for r in results:
            for t in range(len(r["n_step"])):
                writer.writerow([r["eta"], t + 1, r["elbo"][t], r["n_step"][t], r["e_step"][t],
                                 r["predicted"][t], r["total"]])
    serialisable = [{k: np.asarray(v).tolist() for k, v in r.items()} for r in results]
    with open(paths["json"], "w") as f:
        json.dump({**meta, "results": serialisable}, f, indent=2)
    plot_fig3(results, paths["png"], title=f"{meta['dataset']}, step {meta['step']}")
    return paths


def study_meta(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
    """What the JSON records about the run next to the numbers."""
    m, s = config.model, config.study
    temperature = math.sqrt(m.head_channels) if m.temperature is None else m.temperature
    return {
        "dataset": config.data.name,
        "step": step,
        "num_images": s.num_images,
        "batch_size": s.batch_size,
        "num_iters": s.num_iters or m.num_iters,
        "train_mode": s.train_mode,
        "kernel": m.kernel,
        "temperature": temperature,
        "elbo_sigma2": elbo_sigma2(temperature, m.kernel),
        "l2_normalize": m.l2_normalize,
        "stop_em_gradient": m.stop_em_gradient,
    }


def main(argv: Sequence[str]) -> None:
    cli.no_extra_arguments(argv)
    cli.quiet_library_logs()
    FLAGS = flags.FLAGS
    config = FLAGS.config
    workdir, output_dir = (config_check.expand_path(p) if p else p
                           for p in (FLAGS.workdir, FLAGS.output_dir))
    storage.require_local(PROGRAM, {"--output_dir": output_dir or workdir})
    storage.check_bucket(workdir, "--workdir")  # gs:// with a local --output_dir
    config_check.check(config, datasets=datasets.registry(), num_devices=jax.device_count(),
                       data=True, folders={"--output_dir": output_dir or workdir})
    model = create_model(config.model, datasets.get_dataset_info(config.data.name).num_classes)
    mesh = sharding.create_mesh()
    variables, step = load_variables(config, model, workdir, mesh)
    logging.info("Gradient-flow study at step %d on %d training crops.", step,
                 config.study.num_images)
    results = run_study(config, model, variables, fixed_training_crops(config), mesh)
    output_dir = output_dir or os.path.join(workdir or ".", "gradient_flow", f"step_{step}")
    paths = write_results(results, study_meta(config, step), output_dir)
    print(format_table(results))
    print("\n".join(f"wrote {p}" for p in paths.values()))


def _define_flags() -> None:
    """Only when run as a program: importing this module defines no absl flags."""
    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "A training workdir: its checkpoint is studied (else "
                        "the initialisation); results go to <workdir>/gradient_flow/step_<N>.")
    flags.DEFINE_string("output_dir", None, "Where results go instead.")


if __name__ == "__main__":
    cli.run(main, _define_flags)
