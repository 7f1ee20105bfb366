"""What every benchmark shares: timing, compiled-cost readout, the machine, tables, JSON, fits.

Scripts in this folder import it as a sibling (`import common`), as they run as
`python benchmarks/<name>.py` from the repository root.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hemnet_jax import accelerators

# Every benchmark imports this module before JAX picks its backends: on a host without a TPU
# (or GPU), an installed libtpu is kept out of JAX's backend search (hemnet_jax/accelerators.py).
accelerators.keep_tpu_plugin_off_without_tpu()

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # git-ignored


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of one call, after warm-up, each call waited for."""

    median_s: float
    min_s: float
    reps: int


def time_call(
    fn: Callable[[], Any],
    sync: Callable[[Any], Any],
    *,
    warmup: int = 1,
    min_reps: int = 3,
    min_seconds: float = 0.3,
    max_reps: int = 50,
) -> Timing:
    """Times `sync(fn())`: `warmup` untimed calls, then at least `min_reps` timed calls and more
    until `min_seconds` have passed (at most `max_reps`)."""
    for _ in range(warmup):
        sync(fn())
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (
        time.perf_counter() - start < min_seconds and len(times) < max_reps
    ):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), len(times))


def jax_sync(out: Any) -> Any:
    return jax.block_until_ready(out)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Date, command and what it ran on: host CPU, JAX devices, library versions."""
    devices = jax.devices()
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "cpu": cpu_model(),
        "cpu_cores_available": len(os.sched_getaffinity(0)),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average_1min": os.getloadavg()[0],  # other work on a shared host skews times
    }
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name()
    return info


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width table: columns are (key, header, format spec); missing values print '-'."""

    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    cells = [[cell(r, k, s) for k, _, s in columns] for r in rows]
    widths = [
        max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)
    ]
    lines = ["  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) against log(x): 1 for linear growth. None under 2 points."""
    if len(set(xs)) < 2:
        return None
    slope, _ = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(slope)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def mib(num_bytes: float) -> float:
    return num_bytes / 2.0**20
