"""The compiled-plan table of benchmarks/README.md: `python -m hemnet_jax.plan`, one row at a time.

Each row is one real run of the planning command (the TPU compiler through libtpu, no TPU);
its JSON, with the command, the date and the versions added, is written to
benchmarks/plans/<row>.json as soon as that compile ends, so that a long sweep keeps every
finished row. Rows whose JSON exists are skipped (delete it to redo one).

  python benchmarks/plan_table.py --run [--rows voc_v5e8,emanet_v5e8]   # compile (minutes each)
  python benchmarks/plan_table.py                                       # print the Markdown table
  python benchmarks/plan_table.py --mfu 0.4 --input_pipeline benchmarks/plans/input_pipeline.json
      # and what each host must feed at that (assumed) MFU, against the measured tf.data rate
  python benchmarks/plan_table.py --readme   # writes the three tables into benchmarks/README.md

The host-side figures are estimates: the compiled FLOPs per image, an assumed MFU of the chip's
peak dense bf16 FLOP/s (`train_step.PEAK_TFLOPS`), and `input_pipeline.py`'s examples/s on one
core.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import train_step

PLANS_DIR = Path(__file__).resolve().parent / "plans"
ROOT = Path(__file__).resolve().parents[1]

# name -> (config, topology, extra arguments); in the order they are compiled.
ROWS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "voc_v5e8": ("configs/voc.py", "v5e:2x4", ()),
    "emanet_v5e8": ("configs/voc.py:emanet", "v5e:2x4", ()),
    "r50_os16_v5e8": ("configs/voc.py:r50_os16", "v5e:2x4", ()),
    "voc_h100x1": ("configs/voc.py", "h100:1", ()),
    "voc_v5e4": ("configs/voc.py", "v5e:2x2", ("--train_only",)),  # 4 images per chip
    "voc_bf16_h100x1": ("configs/voc.py", "h100:1", ("--config.model.dtype=bfloat16",
                                                     "--train_only")),
    "voc_h100x8": ("configs/voc.py", "h100:8", ("--train_only",)),
    # HEM against EM by T and remat: the GPU compiler (seconds here; no FLOPs), then the TPU's.
    **{
        f"{name}_t{t}{'_remat' if remat else ''}_{where}": (
            config, topology,
            (f"--config.model.num_iters={t}", f"--config.model.remat={remat}", "--train_only"),
        )
        for where, topology in (("h100x1", "h100:1"), ("v5e8", "v5e:2x4"))
        for remat in (False, True) for t in (3, 6, 12)
        for name, config in (("hem", "configs/voc.py"), ("em", "configs/voc.py:emanet"))
        if (t, remat, where) != (3, False, "v5e8")  # = voc_v5e8 and emanet_v5e8
    },
    "context_v5e8": ("configs/context.py", "v5e:2x4", ("--train_only",)),
    "cocostuff_v5e8": ("configs/cocostuff.py", "v5e:2x4", ()),
    "voc_v4_8": ("configs/voc.py", "v4:2x2x1", ("--train_only",)),
    "voc_v5p_8": ("configs/voc.py", "v5p:2x2x1", ("--train_only",)),
    "voc_v6e8": ("configs/voc.py", "v6e:2x4", ("--train_only",)),
    # 16 chips, 4 hosts: the validation batch must divide over them too (voc.py's is 8).
    "voc_v4_32": ("configs/voc.py", "v4:2x2x4", ("--config.eval.batch_size=16", "--train_only")),
    "voc_bf16_v5e8": ("configs/voc.py", "v5e:2x4", ("--config.model.dtype=bfloat16",
                                                    "--train_only")),
    # 6 images per chip: one compile (the search at the end compiles five).
    "voc_b48_v5e8": ("configs/voc.py", "v5e:2x4", ("--config.train.batch_size=48",
                                                   "--train_only")),
    # 7 images per chip fit too, in less memory than 6: near the HBM limit the TPU compiler
    # rematerialises (4% more FLOPs per image) to fit.
    "voc_b56_v5e8": ("configs/voc.py", "v5e:2x4", ("--config.train.batch_size=56",
                                                   "--train_only")),
    # 8 per chip fit as well, in the same 14.7 GiB: the compiler trades its schedule for memory.
    "voc_b64_v5e8": ("configs/voc.py", "v5e:2x4", ("--config.train.batch_size=64",
                                                   "--train_only")),
    # The search of the largest batch that fits, from 8 per chip (one compile per probe).
    "voc_maxbatch_v5e8": ("configs/voc.py", "v5e:2x4", ("--config.train.batch_size=64",
                                                        "--max_batch", "--train_only")),
}


def versions() -> dict[str, str]:
    out = {}
    for package in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "flax"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def command(name: str, path: Path) -> list[str]:
    config, topology, extra = ROWS[name]
    return ["python", "-m", "hemnet_jax.plan", "--config", config, "--topology", topology,
            *extra, "--json", str(path.relative_to(ROOT))]


def run(names: list[str]) -> None:
    """Compiles each row without a JSON yet, one at a time; writes its JSON when it ends."""
    PLANS_DIR.mkdir(exist_ok=True)
    for name in names:
        path = PLANS_DIR / f"{name}.json"
        if path.exists():
            continue
        argv = command(name, path)
        print(f"{datetime.datetime.now():%H:%M:%S} {name}: {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=os.environ.copy(),
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if not path.exists():  # a step that does not fit still writes its JSON, then FATAL
            (PLANS_DIR / f"{name}.failed.txt").write_text(done.stdout + done.stderr)
            print(f"  failed ({done.returncode}) after {wall:.0f} s", flush=True)
            continue
        result = json.loads(path.read_text())
        fatal = [line for line in done.stderr.splitlines() if line.startswith("FATAL:")]
        result["row"] = {
            "command": " ".join(argv), "returncode": done.returncode,
            "fatal": fatal[-1] if fatal else None,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": versions(), "wall_s": round(wall, 1),
            "load_average_1min": os.getloadavg()[0],
        }
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"  done in {wall:.0f} s", flush=True)


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def table_row(name: str, r: dict[str, Any]) -> str:
    train, ev = r["train"], r.get("eval") or {}
    hbm = r["hbm_bytes_per_chip"]
    flops = train["flops_per_step"]  # None: the GPU compiler gives no cost analysis
    flops_image = "-" if flops is None else f"{flops / r['per_chip_batch'] / 1e12:.3f}"
    return " | ".join([
        "", name, f"`{ROWS[name][0]}` {' '.join(ROWS[name][2])}".strip(), r["topology"],
        f"{r['chips']} / {r['hosts']}", f"{r['global_batch']} ({r['per_chip_batch']}/chip)",
        "yes" if train["fits"] else "**no**", gib(train["argument_bytes"]),
        gib(train["temp_bytes"]),
        f"{gib(train['total_bytes'])} / {hbm / 2**30:.0f}",
        flops_image, f"{train['compile_s']:.0f}",
        gib(ev.get("total_bytes")),
        "-" if ev.get("compile_s") is None else f"{ev['compile_s']:.0f}",
        "-" if r.get("max_global_batch") is None else str(r["max_global_batch"]), "",
    ]).strip()


HEADER = (
    "| row | config | topology | chips / hosts | global batch | train fits | arguments GiB/chip "
    "| temporaries GiB/chip | train total / HBM GiB/chip | TFLOP per image (train) | train "
    "compile s | eval total GiB/chip | eval compile s | max global batch |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def sweep_table() -> str:
    """HEM against EM by T and remat, from the sweep rows (T = 3 without remat on v5e-8: the
    voc_v5e8 and emanet_v5e8 rows): temporaries and total per chip, FLOPs per image."""
    lines = ["| compiler | T | remat | HEM temporaries GiB | EM temporaries GiB | HEM total GiB "
             "| EM total GiB | HEM TFLOP/image | EM TFLOP/image |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = {("v5e8", 3, False): ("voc_v5e8", "emanet_v5e8")}
    for where in ("h100x1", "v5e8"):
        for remat in (False, True):
            for t in (3, 6, 12):
                suffix = f"_t{t}{'_remat' if remat else ''}_{where}"
                names = base.get((where, t, remat), (f"hem{suffix}", f"em{suffix}"))
                paths = [PLANS_DIR / f"{n}.json" for n in names]
                if not all(p.exists() for p in paths):
                    continue
                hem, em = (json.loads(p.read_text()) for p in paths)

                def per_image(r: dict[str, Any]) -> str:
                    flops = r["train"]["flops_per_step"]
                    return "-" if flops is None else f"{flops / r['per_chip_batch'] / 1e12:.3f}"

                lines.append(" | ".join([
                    "", ROWS[names[0]][1] if names[0] in ROWS else where, str(t),
                    "yes" if remat else "no", gib(hem["train"]["temp_bytes"]),
                    gib(em["train"]["temp_bytes"]), gib(hem["train"]["total_bytes"]),
                    gib(em["train"]["total_bytes"]), per_image(hem), per_image(em), ""]).strip())
    return "\n".join(lines)


def render() -> str:
    lines = [HEADER]
    for name in ROWS:
        path = PLANS_DIR / f"{name}.json"
        if path.exists():
            lines.append(table_row(name, json.loads(path.read_text())))
    return "\n".join(lines)


# Device kinds as JAX names them, for train_step.peak_tflops.
DEVICE_KINDS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite",
                "h100": "NVIDIA H100 80GB HBM3"}


def host_feed(mfu: float, per_core: float | None) -> str:
    """Per row with FLOPs: images/s per chip and per host at `mfu` of the chip's peak, and the
    host cores that rate needs at `per_core` examples/s each (all estimates)."""
    lines = ["| row | TFLOP per image | peak TFLOP/s per chip | images/s per chip (est.) | chips "
             "per host | images/s per host (est.) | host cores needed (est.) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ROWS:
        path = PLANS_DIR / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        flops = r["train"]["flops_per_step"]
        peak = train_step.peak_tflops(DEVICE_KINDS[r["topology"].split(":")[0]])
        if not flops or not peak:
            continue
        per_image = flops / r["per_chip_batch"]
        chip_rate = mfu * peak * 1e12 / per_image
        per_host = r["chips"] // r["hosts"]
        host_rate = chip_rate * per_host
        cores = "-" if not per_core else f"{host_rate / per_core:.1f}"
        lines.append(f"| {name} | {per_image / 1e12:.3f} | {peak:.0f} | {chip_rate:.1f} | "
                     f"{per_host} | {host_rate:.0f} | {cores} |")
    return "\n".join(lines)


README = Path(__file__).resolve().parent / "README.md"
MFU = 0.4  # the assumed MFU of README's host-feed table
INPUT_PIPELINE = PLANS_DIR / "input_pipeline.json"


def per_core_rate(path: Path) -> float:
    """input_pipeline.py's examples/s with one thread: the rate of one host core."""
    rows = json.loads(path.read_text())["results"]
    return next(r["examples_per_s_per_core"] for r in rows if r["threads"] == 1)


def write_readme(readme: Path = README) -> None:
    """Replaces `readme`'s blocks between `<!-- plan-table -->`, `<!-- plan-sweep -->` and
    `<!-- plan-host -->` and their closing markers with the tables of the JSONs."""
    text = readme.read_text()
    per_core = per_core_rate(INPUT_PIPELINE)
    blocks = {
        "plan-table": render(),
        "plan-sweep": sweep_table(),
        "plan-host": (f"tf.data, one thread: {per_core} examples/s per core "
                      f"({INPUT_PIPELINE.relative_to(ROOT)})\n\nEstimates at an assumed MFU "
                      f"of {MFU:.0%}:\n\n{host_feed(MFU, per_core)}"),
    }
    for marker, block in blocks.items():
        start, end = f"<!-- {marker} -->\n", f"\n<!-- /{marker} -->"
        head, rest = text.split(start)
        _, tail = rest.split(end)
        text = head + start + block + end + tail
    readme.write_text(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true", help="compile the rows without a JSON")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    p.add_argument("--mfu", type=float, default=None,
                   help="also estimate what each host must feed at this MFU (e.g. 0.4)")
    p.add_argument("--input_pipeline", default=None,
                   help="input_pipeline.py's JSON: its 1-thread examples/s is the rate per core")
    p.add_argument("--readme", action="store_true",
                   help="write the tables (host feed at MFU 0.4) into benchmarks/README.md")
    args = p.parse_args(argv)
    if args.run:
        run([n for n in args.rows.split(",") if n])
    if args.readme:
        write_readme()
        print(f"Wrote the tables into {README}.")
        return
    print(render())
    print("\nHEM against EM (configs/voc.py and its :emanet variant), train step:\n")
    print(sweep_table())
    if args.mfu:
        per_core = None
        if args.input_pipeline:
            per_core = per_core_rate(Path(args.input_pipeline))
            print(f"\ntf.data, one thread: {per_core} examples/s per core ({args.input_pipeline})")
        print(f"\nEstimates at an assumed MFU of {args.mfu:.0%}:\n")
        print(host_feed(args.mfu, per_core))


if __name__ == "__main__":
    main()
