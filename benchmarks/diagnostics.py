"""What the basis diagnostics cost in training: the train step beside the diagnostics probe.

Training runs `training.diagnostics.make_probe(train=True)` (one forward pass of the network on
the step's batch) plus the host-side summary (`diagnostics.scalars`: cosine clusters of mu0,
effective numbers) once per `train.log_every` steps. Overhead = (probe + summary) / (log_every
x step). Synthetic images and labels on device, as benchmarks/train_step.py; times are the
median of repeated calls after a warm-up (common.time_call).

  python benchmarks/diagnostics.py        # the demo: configs/synthetic.py, its batch and crop
"""

from __future__ import annotations

import argparse
from typing import Any

import common
import jax
import numpy as np

from hemnet_jax.cli import load_config_file
from hemnet_jax.models import create_model
from hemnet_jax.training import diagnostics, sharding
from hemnet_jax.training.state import init_state, optimizer_for
from hemnet_jax.training.train_step import make_train_step

NUM_CLASSES = 21


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/synthetic.py")
    p.add_argument("--crop_size", type=int, default=None, help="default: the config's")
    p.add_argument("--batch_size", type=int, default=None, help="default: the config's")
    p.add_argument("--json", default=str(common.RESULTS_DIR / "diagnostics.json"))
    args = p.parse_args(argv)

    config = load_config_file(args.config)
    crop = args.crop_size or config.data.crop_size
    batch_size = args.batch_size or config.train.batch_size
    config.train.batch_size = batch_size
    mesh = sharding.create_mesh()
    model = create_model(config.model, NUM_CLASSES)
    tx, schedule = optimizer_for(config, model)
    state = init_state(config, model, tx, mesh)
    step = make_train_step(model, tx, schedule, config, mesh)
    probe = diagnostics.make_probe(model, mesh, train=True)
    rng = np.random.default_rng(0)
    batch = sharding.global_batch({
        "image": rng.standard_normal((batch_size, crop, crop, 3), np.float32),
        "label": rng.integers(0, NUM_CLASSES, (batch_size, crop, crop), np.int32),
    }, mesh)
    key = jax.random.PRNGKey(0)

    holder = {"state": state}

    def train_step():
        holder["state"], metrics = step(holder["state"], batch, key)
        return metrics

    def probe_and_summary():
        sums = diagnostics.add_stats(None, probe(holder["state"].variables, batch["image"]))
        return diagnostics.scalars(sums)

    t_step = common.time_call(train_step, common.jax_sync, warmup=2, min_reps=10)
    t_probe = common.time_call(probe_and_summary, lambda x: x, warmup=2, min_reps=10)
    log_every = config.train.log_every
    row = {
        "config": args.config, "batch": batch_size, "crop": crop,
        "K": config.model.num_bases, "C": config.model.head_channels,
        "step_ms": 1e3 * t_step.median_s, "probe_ms": 1e3 * t_probe.median_s,
        "log_every": log_every,
        "overhead_pct": 100 * t_probe.median_s / (log_every * t_step.median_s),
    }
    columns = [("config", "config", "s"), ("batch", "batch", "d"), ("crop", "crop", "d"),
               ("K", "K", "d"), ("C", "C", "d"), ("step_ms", "step ms", ".1f"),
               ("probe_ms", "probe+summary ms", ".1f"), ("log_every", "log_every", "d"),
               ("overhead_pct", "overhead %", ".2f")]
    print(common.format_table([row], columns))
    result = {"machine": common.machine(), "rows": [row]}
    print(f"wrote {common.write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
