"""What a checkpoint in a bucket costs: save and verified restore of a training state
(`Checkpointer`, the code training runs) to local disk and to a Cloud Storage API server, with
the number and sizes of the objects one checkpoint is made of (each is one request or more).

The server is the one STORAGE_EMULATOR_HOST names, or else a fake-gcs-server on 127.0.0.1 that
this script starts (tests/gcs_server.py; its bucket `bench`). A local server has no network
latency: on a real bucket each object costs a round trip (tens of ms) on top, so the object
count is the figure that carries over.

  python benchmarks/checkpoint_gcs.py [--config tests/tiny.py] [--reps 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
import fsspec
import jax
from checkpoint_digest import random_state

from hemnet_jax import storage
from hemnet_jax.data import datasets
from hemnet_jax.models import create_model
from hemnet_jax.training import checkpointing, sharding
from hemnet_jax.training.state import abstract_state, optimizer_for

BUCKET = "bench"
SMALL = 4096  # bytes: an object below this is all per-request overhead


def _objects(directory: str) -> list[int]:
    """Sizes of every file (object) under `directory`."""
    fs, path = fsspec.core.url_to_fs(directory)  # local or gs:// (gcsfs)
    return [info["size"] for info in fs.find(path, detail=True).values()]


def measure(root: str, config, state, reps: int) -> dict:
    """Median save and restore seconds to `root`, and the objects of one checkpoint."""
    model = create_model(config.model, datasets.get_dataset_info(config.data.name).num_classes)
    tx, _ = optimizer_for(config, model)
    abstract = abstract_state(model, tx, sharding.create_mesh(jax.devices()[:1]))
    meta = checkpointing.run_metadata(config)
    saves, restores = [], []
    for rep in range(reps + 1):  # the first round warms up orbax and the connection
        ckpt = checkpointing.Checkpointer(f"{root}/run{rep}/checkpoints", keep=None)
        t0 = time.perf_counter()
        ckpt.save(1, state, meta, force=True)
        ckpt.wait()
        saved = time.perf_counter() - t0
        ckpt.close()
        reader = checkpointing.Checkpointer(f"{root}/run{rep}/checkpoints", read_only=True)
        t0 = time.perf_counter()
        jax.block_until_ready(reader.restore(abstract, config, 1)[0])
        restored = time.perf_counter() - t0
        if rep:
            saves.append(saved)
            restores.append(restored)
    sizes = _objects(f"{root}/run0/checkpoints/1")
    return {"save_s": statistics.median(saves), "restore_s": statistics.median(restores),
            "objects": len(sizes), "small_objects": sum(s < SMALL for s in sizes),
            "kib": sum(sizes) / 1024}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tests/tiny.py")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/checkpoint_gcs.json")
    args = parser.parse_args(argv)

    server = None
    if storage.emulator_url() is None:
        from tests.gcs_server import GcsServer

        server = GcsServer().start()
        os.environ[storage.EMULATOR_VARIABLE] = server.url
    storage.configure()
    try:
        if server is not None:
            server.create_bucket(BUCKET)
        config, state = random_state(args.config)
        jax.block_until_ready(state)
        with tempfile.TemporaryDirectory(prefix="hemnet_gcs_bench_") as local:
            rows = [{"target": "local disk", **measure(local, config, state, args.reps)}]
        rows.append({"target": f"server {storage.emulator_url()}",
                     **measure(f"gs://{BUCKET}/checkpoint_gcs", config, state, args.reps)})
    finally:
        if server is not None:
            server.stop()
    local_row = rows[0]
    for row in rows:
        row["save_x"] = row["save_s"] / local_row["save_s"]
        row["restore_x"] = row["restore_s"] / local_row["restore_s"]
    columns = [("target", "target", "s"), ("save_s", "save s", ".3f"),
               ("save_x", "save / local", ".2f"), ("restore_s", "restore s", ".3f"),
               ("restore_x", "restore / local", ".2f"), ("objects", "objects", "d"),
               ("small_objects", f"objects < {SMALL} B", "d"), ("kib", "KiB", ".0f")]
    print(common.format_table(rows, columns))
    result = {
        "benchmark": "checkpoint_gcs",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": common.machine(),
        "config": args.config,
        "reps": args.reps,
        "rows": rows,
    }
    print(f"JSON written to {common.write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
