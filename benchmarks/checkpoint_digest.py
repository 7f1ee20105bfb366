"""What the checkpoint digest costs: saving a training state of a real config's size with the
digest (hemnet_jax's `Checkpointer.save`, then waiting for the write) and without it (the same
orbax `CheckpointManager` save of the same items, no digest), and the digest alone.

The state is the config's real tree (params, SGD momentum, BatchNorm statistics, HEM bases,
step) filled with random values (zeros would compress to nothing). Each save goes to a fresh step
of a checkpoints directory under --dir (default: a temporary directory on local disk); the
reported time is from the save call until the write is complete.

  python benchmarks/checkpoint_digest.py [--config configs/voc.py] [--reps 3] [--dir DIR]
      [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from hemnet_jax.cli import load_config_file
from hemnet_jax.data import datasets
from hemnet_jax.models import create_model
from hemnet_jax.training import checkpointing, digest, sharding
from hemnet_jax.training.state import abstract_state, optimizer_for


def random_state(config_path: str):
    """The training state of `config_path`'s model, random values, on the default devices."""
    config = load_config_file(config_path)
    model = create_model(config.model, datasets.get_dataset_info(config.data.name).num_classes)
    tx, _ = optimizer_for(config, model)
    mesh = sharding.create_mesh(jax.devices()[:1])
    abstract = abstract_state(model, tx, mesh)
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    values = [
        jax.random.normal(k, a.shape, a.dtype) if jnp.issubdtype(a.dtype, jnp.floating)
        else jnp.zeros(a.shape, a.dtype)
        for k, a in zip(keys, leaves, strict=True)
    ]
    return config, jax.tree.unflatten(treedef, values)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/voc.py")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to save (default: a temporary dir)")
    parser.add_argument("--json", default="benchmarks/results/checkpoint_digest.json")
    args = parser.parse_args(argv)

    config, state = random_state(args.config)
    jax.block_until_ready(state)
    leaves = jax.tree.leaves(state)
    state_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    meta = checkpointing.run_metadata(config)
    root = Path(args.dir or tempfile.mkdtemp(prefix="hemnet_digest_bench_"))

    digest.state_digest(state)  # compile
    digest_s = common.time_call(lambda: digest.state_digest(state), lambda x: x,
                                warmup=0, min_reps=args.reps, min_seconds=0.0)

    with_digest, without = [], []
    for rep in range(args.reps + 1):  # the first round warms up orbax and the disk
        for name in ("with", "without"):
            directory = root / f"{name}_{rep}"
            if name == "with":
                ckpt = checkpointing.Checkpointer(str(directory), keep=None)
                t0 = time.perf_counter()
                ckpt.save(1, state, meta, force=True)
                ckpt.wait()
                elapsed = time.perf_counter() - t0
                ckpt.close()
            else:
                manager = ocp.CheckpointManager(
                    str(directory), options=ocp.CheckpointManagerOptions(
                        enable_async_checkpointing=True, create=True))
                t0 = time.perf_counter()
                manager.save(1, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
                manager.wait_until_finished()
                elapsed = time.perf_counter() - t0
                manager.close()
            if rep:
                (with_digest if name == "with" else without).append(elapsed)
            shutil.rmtree(directory, ignore_errors=True)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)

    row = {
        "config": args.config,
        "arrays": len(leaves),
        "state_mib": common.mib(state_bytes),
        "save_s": statistics.median(without),
        "save_with_digest_s": statistics.median(with_digest),
        "digest_s": digest_s.median_s,
    }
    row["digest_share_of_save"] = row["digest_s"] / row["save_s"]
    row["overhead_share"] = row["save_with_digest_s"] / row["save_s"] - 1
    columns = [("config", "config", "s"), ("arrays", "arrays", "d"),
               ("state_mib", "state MiB", ".1f"), ("save_s", "save s", ".3f"),
               ("save_with_digest_s", "save+digest s", ".3f"), ("digest_s", "digest s", ".3f"),
               ("digest_share_of_save", "digest/save", ".3f"),
               ("overhead_share", "measured overhead", ".3f")]
    print(common.format_table([row], columns))
    result = {
        "benchmark": "checkpoint_digest",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": common.machine(),
        "reps": args.reps,
        "saves_with_digest_s": with_digest,
        "saves_without_digest_s": without,
        "rows": [row],
    }
    print(f"JSON written to {common.write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
