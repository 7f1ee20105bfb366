"""What it costs processes to agree on a checkpoint save's outcome (docs/operations.md): one
`Checkpointer.check_saved` agreement (an all-gather of one integer over every device of every
process), and one barrier of orbax's save threads through the coordination service
(`save_barrier.SaveBarrier`), for N processes on localhost (CPU devices, gloo).

  python benchmarks/save_agreement.py [--processes 2] [--devices 2] [--reps 200] [--json PATH]

Training pays the agreement at a log step only while a save is being written (at most once per
log step), and the barrier a few times per save, in orbax's background threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time

import common
import jax

from hemnet_jax.training import checkpointing, sharding
from hemnet_jax.training.save_barrier import SaveBarrier


def _measure(reps: int) -> dict[str, float]:
    """Per-call milliseconds (median, min) of the agreement and of the barrier, after warm-up."""
    result = {}
    agree = common.time_call(lambda: checkpointing._on_every_process(1), lambda x: x,  # noqa: SLF001
                             warmup=5, min_reps=reps, max_reps=reps)
    barrier = SaveBarrier()
    meet = common.time_call(lambda: barrier(key="benchmark", timeout_ms=60_000), lambda x: x,
                            warmup=5, min_reps=reps, max_reps=reps)
    for name, t in (("agreement", agree), ("barrier", meet)):
        result[f"{name}_median_ms"], result[f"{name}_min_ms"] = t.median_s * 1e3, t.min_s * 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--json", default=None)
    parser.add_argument("--process_id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.process_id is not None:  # one of the processes
        sharding.initialize_distributed(args.coordinator, args.processes, args.process_id)
        result = _measure(args.reps)
        if jax.process_index() == 0:
            print(json.dumps(result), flush=True)
        return

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
    cmd = [sys.executable, __file__, f"--processes={args.processes}", f"--reps={args.reps}",
           f"--coordinator=127.0.0.1:{port}"]
    start = time.time()
    children = [subprocess.Popen([*cmd, f"--process_id={i}"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
                for i in range(args.processes)]
    outputs = [c.communicate(timeout=600)[0] for c in children]
    if any(c.returncode for c in children):
        sys.exit(f"a process failed: {[c.returncode for c in children]}")
    result = json.loads(outputs[0].strip().splitlines()[-1])
    rows = [{"what": name, "median_ms": result[f"{name}_median_ms"],
             "min_ms": result[f"{name}_min_ms"]} for name in ("agreement", "barrier")]
    print(f"{args.processes} processes x {args.devices} CPU devices, {args.reps} calls each")
    print(common.format_table(rows, [("what", "what", "s"), ("median_ms", "median ms", ".3f"),
                                     ("min_ms", "min ms", ".3f")]))
    path = args.json or common.RESULTS_DIR / f"save_agreement_{datetime.date.today()}.json"
    common.write_json(path, {**common.machine(), "processes": args.processes,
                             "devices_per_process": args.devices, "reps": args.reps,
                             "wall_s": time.time() - start, "rows": rows})


if __name__ == "__main__":
    main()
