"""`python -m hemnet_jax.plan` through its real CLI: the tiny config compiled by libtpu for a
single-host and a multi-host Cloud TPU slice, its JSON, its FATAL lines; and the programs'
start-up rule that keeps libtpu out of JAX's backend search on a host without a TPU."""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hemnet_jax import accelerators, compiled_hlo, plan, tpu_topology

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
TOP_KEYS = {"topology", "chips", "hosts", "global_batch", "per_chip_batch", "hbm_bytes_per_chip",
            "train", "eval", "max_global_batch"}
STEP_KEYS = {"argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "flops_per_step",
             "compile_s", "fits"}
LIBTPU_NOISE = ("TPU_WORKER_HOSTNAMES", "libtpu", "TPU accelerator type")


def _env(**changes: str | None) -> dict[str, str]:
    """The session's environment (conftest.py), this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("TPU_LIBRARY_PATH", None)  # set by libtpu's import (in `import jax`) in this process
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _plan(*args: str, json_path: Path | None = None, env: dict | None = None):
    cmd = [sys.executable, "-m", "hemnet_jax.plan", "--config", "tests/tiny.py", *args]
    if json_path is not None:
        cmd += ["--json", str(json_path)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=env or _env())


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert not any(n in result.stderr for n in LIBTPU_NOISE), result.stderr


def _fatal(result) -> str:
    """The one FATAL line of a failed run (and nothing else on stderr but progress lines)."""
    assert result.returncode == 1, result.stdout + result.stderr
    fatal = [line for line in result.stderr.splitlines() if line.startswith("FATAL: ")]
    assert len(fatal) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return fatal[0]


# ---------------------------------------------------------------------------------------------
# Compiles (tens of seconds each on 2 cores).


@pytest.mark.heavy(seconds=70)
def test_single_host_plan_flops_and_does_not_fit(tmp_path):
    """v5e:2x4 (8 chips, one host). At global batch 8: the JSON keys of the issue, figures
    consistent with each other. At 16, planned against exactly the HBM that batch 8 needs: one
    FATAL line with the excess and the largest batch that fits (8, by one more compile), the JSON
    written, and per-chip FLOPs 1.8-2x those of batch 8."""
    path = tmp_path / "b8.json"
    result = _plan("--topology", "v5e:2x4", json_path=path)  # tiny: batch 8
    _ok(result)
    plan, text = json.loads(path.read_text()), result.stdout
    assert TOP_KEYS <= set(plan)
    assert STEP_KEYS <= set(plan["train"]) and STEP_KEYS <= set(plan["eval"])
    assert (plan["topology"], plan["chips"], plan["hosts"]) == ("v5e:2x4", 8, 1)
    assert (plan["global_batch"], plan["per_chip_batch"]) == (8, 1)
    assert plan["hbm_bytes_per_chip"] == 16 * GIB and plan["max_global_batch"] is None
    for step in ("train", "eval"):
        s = plan[step]
        assert s["fits"] is True and s["flops_per_step"] > 0 and s["compile_s"] > 0
        assert 0 < s["total_bytes"] <= s["argument_bytes"] + s["output_bytes"] + s["temp_bytes"]
        assert s["temp_bytes"] > 0
    # Replicated state, sharded batch: the gradients and every BatchNorm are all-reduced.
    assert plan["train"]["collectives"]["all-reduce"]["count"] > 10
    for name, found in plan["train"]["slice_reductions"].items():
        assert found["found"] >= 1 and found["all_reduced"] == found["found"], name
    assert plan["input"] == {"per_process_batch": [8], "matches_sharding": True}
    assert "HBM per chip" in text and "not measurements" in text and "train step" in text

    budget = plan["train"]["total_bytes"]  # batch 8 fits it exactly (total <= HBM)
    path = tmp_path / "b16.json"
    result = _plan("--topology", "v5e:2x4", "--config.train.batch_size=16",
                   f"--hbm_gib={budget / GIB!r}", json_path=path)
    fatal = _fatal(result)
    double = json.loads(path.read_text())
    assert double["hbm_bytes_per_chip"] == budget and double["per_chip_batch"] == 2
    excess = double["train"]["total_bytes"] - budget
    assert excess > 0 and double["train"]["fits"] is False and double["max_global_batch"] == 8
    assert fatal.startswith("FATAL: train.batch_size=16 does not fit on v5e:2x4 (")
    needs, more = re.search(r"needs ([\d.]+) MiB per chip, ([\d.]+) MiB more", fatal).groups()
    assert float(more) == pytest.approx(excess / 2**20, abs=0.051)
    assert float(needs) == pytest.approx(double["train"]["total_bytes"] / 2**20, abs=0.051)
    assert fatal.endswith("the largest global batch that fits is 8: pass "
                          "--config.train.batch_size=8.")
    ratio = double["train"]["flops_per_step"] / plan["train"]["flops_per_step"]
    assert 1.8 <= ratio <= 2.0, ratio
    assert double["eval"]["flops_per_step"] == plan["eval"]["flops_per_step"]  # same eval batch


@pytest.mark.heavy(seconds=30)
def test_multi_host_plan_from_one_process(tmp_path):
    """v5e:4x4: 16 chips on 4 hosts compiled by this one process; each host's input pipeline
    feeds the rows its chips hold; BatchNorm statistics and the bases' batch mean are
    all-reduced over all 16 chips. With `--train_only`: the train step alone is compiled."""
    path = tmp_path / "plan.json"
    result = _plan("--topology", "v5e:4x4", "--config.train.batch_size=32",
                   "--config.eval.batch_size=16", "--train_only", json_path=path)
    _ok(result)
    plan = json.loads(path.read_text())
    assert plan["eval"] is None and plan["train"]["fits"]
    assert plan["train"]["flops_per_step"] > 0 and plan["train"]["temp_bytes"] > 0
    assert "eval step:  not compiled (--train_only)." in result.stdout
    assert "Compile time on this machine: train " in result.stdout
    assert ", eval" not in result.stdout
    assert (plan["chips"], plan["hosts"], plan["per_chip_batch"]) == (16, 4, 2)
    assert plan["input"] == {"per_process_batch": [8, 8, 8, 8], "matches_sharding": True}
    reductions = plan["train"]["slice_reductions"]
    assert reductions["BatchNorm statistics"]["found"] > 20  # tiny ResNet + head: 31 BNs
    assert reductions["bases' batch mean"]["found"] == 1
    for found in reductions.values():
        assert found["all_reduced"] == found["found"]
    assert "each of the 4 hosts feeds 8 of the global batch's 32 images" in result.stdout
    assert "all-reduced over the 16 chips" in result.stdout


@pytest.mark.heavy(seconds=15)
def test_a_step_the_compiler_refuses_does_not_fit(tmp_path):
    """Far beyond the HBM (one 8192 x 8192 crop per chip), libtpu refuses the program with
    RESOURCE_EXHAUSTED instead of sizing it: the plan reports a step that does not fit, with the
    compiler's words, in its text, its JSON and one FATAL line, and no figures it does not have."""
    path = tmp_path / "refused.json"
    result = _plan("--topology", "v5e:2x4", "--config.data.crop_size=8192",
                   "--config.data.allow_large_crop=True", "--train_only", json_path=path)
    fatal = _fatal(result)
    train = json.loads(path.read_text())["train"]
    assert train["fits"] is False and train["refused"].startswith("Ran out of memory"), train
    assert train["total_bytes"] is None and train["flops_per_step"] is None
    assert "exceeds available HBM" in train["refused"]
    assert f"The compiler refused the train step: {train['refused']}" in result.stdout
    assert fatal.startswith("FATAL: train.batch_size=8 does not fit on v5e:2x4 (16.00 GiB HBM "
                            "per chip): the train step was refused by the compiler (Ran out of")
    assert fatal.endswith("not even one image per chip fits: use a chip with more HBM, "
                          "--config.model.dtype=bfloat16, --config.model.remat=True or a smaller "
                          "data.crop_size.")


# ---------------------------------------------------------------------------------------------
# FATAL lines before any compile (seconds).


def test_unknown_topology_lists_the_known_ones():
    fatal = _fatal(_plan("--topology", "v5e:3x3"))
    assert "--topology 'v5e:3x3': not a Cloud TPU slice" in fatal
    assert all(name in fatal for name in ("v5e:2x4", "v4:2x2x4", "v5p:2x2x1", "v6e:16x16"))


def test_batch_not_dividing_over_the_chips():
    fatal = _fatal(_plan("--topology", "v5e:4x4", "--config.eval.batch_size=16"))  # train: 8
    assert "train.batch_size=8: not a multiple of the 16 devices" in fatal


def test_non_positive_hbm_budget():
    fatal = _fatal(_plan("--topology", "v5e:2x4", "--hbm_gib=0"))
    assert fatal == "FATAL: --hbm_gib=0.0: pass a positive number of GiB per chip."


def test_libtpu_missing_says_how_to_install(tmp_path):
    shadow = tmp_path / "libtpu"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('no libtpu in this test')\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join((str(tmp_path), env["PYTHONPATH"]))
    fatal = _fatal(_plan("--topology", "v5e:2x4", env=env))
    assert "libtpu is not installed" in fatal
    assert "pip install -r requirements-test.txt" in fatal and "libtpu==0.0.42.*" in fatal


# ---------------------------------------------------------------------------------------------
# Parts, on known inputs.


def test_topologies_chips_hosts_and_hbm():
    single, multi = tpu_topology.parse_topology("v5e:2x4"), tpu_topology.parse_topology("v4:2x2x4")
    assert (single.chips, single.hosts, single.hbm_bytes_per_chip) == (8, 1, 16 * GIB)
    assert (multi.chips, multi.hosts, multi.chips_per_host_bounds) == (16, 4, (2, 2, 1))
    assert tpu_topology.parse_topology("v5e:4x4").hosts == 4
    with pytest.raises(tpu_topology.UnknownTopologyError, match="Known: v4:2x2x1"):
        tpu_topology.parse_topology("v9:2x2")


class _KnownLimit(plan.Planner):
    """The search alone: a train step fits up to `limit` images per chip; no compiler."""

    def __init__(self, chips: int, limit: int):
        self._chips, self.limit, self.compiled = chips, limit, []

    @property
    def chips(self) -> int:
        return self._chips

    def train(self, global_batch: int):
        self.compiled.append(global_batch)
        return types.SimpleNamespace(fits=global_batch // self._chips <= self.limit)


@pytest.mark.parametrize("known, limit, largest, compiled", [
    ({64: True}, 11, 88, [128, 96, 80, 88]),  # doubles once, then bisects 8..16 per chip
    ({64: True}, 8, 64, [128, 96, 80, 72]),
    ({16: False}, 1, 8, [8]),  # a batch that does not fit: the search below it
    ({16: False}, 0, None, [8]),  # not even one image per chip
    ({8: True}, 4096, 8 * 4096, [16 * 2**k for k in range(12)]),  # stops doubling at the cap
])
def test_largest_fitting_batch_doubles_then_bisects(known, limit, largest, compiled):
    planner = _KnownLimit(chips=8, limit=limit)
    probes = dict(known)
    assert planner.largest_fitting_batch(probes) == (largest, len(compiled))
    assert planner.compiled == compiled
    assert probes == {**known, **{b: b // 8 <= limit for b in compiled}}


_DEVICES_SCRIPT = """
import json, sys
from hemnet_jax import tpu_topology
out = {}
for name in sys.argv[1:]:
    devices = tpu_topology.compile_only_devices(tpu_topology.parse_topology(name))
    out[name] = [len(devices), len({d.process_index for d in devices}),
                 len({tuple(d.coords) for d in devices})]
print(json.dumps(out))
"""


def test_compile_only_devices_are_one_per_chip():
    """A device per chip for every generation, as JAX has on the slice: v4's and v5p's two
    TensorCores per chip as one (megacore; libtpu's default for v4 is a device per core)."""
    names = ("v4:2x2x1", "v4:2x2x4", "v5p:2x2x1", "v5e:2x4", "v5e:4x4", "v6e:2x4")
    done = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, *names], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for name in names:
        t = tpu_topology.parse_topology(name)
        assert found[name] == [t.chips, t.hosts, t.chips], name


HLO = """\
HloModule m

%fused_computation.1 (param_0: f32[8,4]) -> f32[4] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  %reduce.1 = f32[4]{0} reduce(%param_0, %c), dimensions={0}, metadata={op_name="jit(f)/bn/reduce_sum"}
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ar.2 = f32[4]{0} all-reduce(%x), channel_id=2, replica_groups=[2,4]<=[8], to_apply=%add
}

ENTRY %main (a: f32[8,4]) -> f32[4] {
  %fusion.1 = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused_computation.1
  %copy.1 = f32[4]{0} copy(%fusion.1)
  %ar.1 = (f32[4]{0}, bf16[16,2]{1,0}) all-reduce-start(%copy.1, %b), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add, metadata={op_name="jit(f)/grads"}
  %ar.1d = (f32[4]{0}, bf16[16,2]{1,0}) all-reduce-done(%ar.1)
  %gte.1 = bf16[16,2]{1,0} get-tuple-element(%ar.1d), index=1, metadata={op_name="jit(f)/hem/_update_bases/reduce_sum"}
  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ag = f32[32]{0} all-gather(%y), replica_groups=mesh['x'=8] {'x'}, dimensions={0}
}
"""  # noqa: E501  (HLO lines as XLA prints them)


def test_collectives_and_reductions_over_the_slice_from_hlo_text():
    found = compiled_hlo.collectives(HLO)
    # all-reduce-start counts once (16 + 64 bytes); the loop's all-reduce 3 times (3 x 16).
    assert found["all-reduce"] == compiled_hlo.Collective(count=4, bytes=80 + 48)
    assert found["all-gather"] == compiled_hlo.Collective(count=1, bytes=128)
    assert set(found) == {"all-reduce", "all-gather"}
    # The fused BN reduction reaches the 8-device all-reduce through a copy; the bases' mean is
    # a tuple element of it; over 4 devices (the loop's groups) would not count as the slice.
    assert compiled_hlo.all_reduced_over(HLO, r"bn/reduce_sum$", 8) == {
        "jit(f)/bn/reduce_sum": True}
    assert compiled_hlo.all_reduced_over(HLO, r"_update_bases", 8) == {
        "jit(f)/hem/_update_bases/reduce_sum": True}
    assert compiled_hlo.all_reduced_over(HLO, r"bn/reduce_sum$", 16) == {
        "jit(f)/bn/reduce_sum": False}


# ---------------------------------------------------------------------------------------------
# The start-up rule: libtpu installed, no TPU on this host.


def _fake_root(tmp_path: Path, files: dict[str, str]) -> str:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return str(tmp_path)


def test_host_detection(tmp_path):
    pci = "sys/bus/pci/devices/0000:00:04.0/"
    tpu_vm = _fake_root(tmp_path / "a", {pci + "vendor": "0x1ae0\n", pci + "device": "0x0063"})
    accel = _fake_root(tmp_path / "b", {"dev/accel0": ""})
    vfio = _fake_root(tmp_path / "c", {"dev/vfio/0": "", "dev/vfio/vfio": ""})
    gpu = _fake_root(tmp_path / "d", {"dev/nvidia0": "", pci + "vendor": "0x10de\n"})
    cpu = _fake_root(tmp_path / "e", {pci + "vendor": "0x8086\n", "dev/vfio/vfio": ""})
    assert all(accelerators.host_may_have_tpu(r) for r in (tpu_vm, accel, vfio))
    assert not accelerators.host_may_have_tpu(gpu) and accelerators.host_may_have_gpu(gpu)
    assert not accelerators.host_may_have_tpu(cpu) and not accelerators.host_may_have_gpu(cpu)


@pytest.mark.heavy(seconds=20)
def test_cpu_program_start_does_not_probe_libtpu(tmp_path):
    """With libtpu importable and JAX_PLATFORMS unset: a plain JAX start probes the TPU backend
    and prints libtpu's errors (the trap); the programs' start-up (`cli._start_program`, what
    every program runs first) then JAX's backends print nothing of libtpu, and train.py's config
    mistake its FATAL line alone. The rule leaves JAX alone on a TPU VM or a GPU host."""
    # Another process holding libtpu's lock file (/tmp/libtpu_lockfile) would make the probe
    # fail early and silently (still seconds): allowed to load side by side, it always speaks.
    env = _env(JAX_PLATFORMS=None, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    plain = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert plain.stdout.strip() == "cpu"
    assert any(n in plain.stderr for n in LIBTPU_NOISE), "the trap is gone: " + plain.stderr
    started = subprocess.run(
        [sys.executable, "-c", "from hemnet_jax import cli; cli._start_program()\n"
         "import jax; print(jax.devices()[0].platform)"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert started.stdout.strip() == "cpu", started.stderr
    assert not any(n in started.stderr for n in LIBTPU_NOISE), started.stderr
    program = subprocess.run(
        [sys.executable, "train.py", "--config", "tests/tiny.py", "--workdir",
         str(tmp_path / "w"), "--config.train.learning_rate=-1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    fatal = _fatal(program)
    assert "train.learning_rate=-1" in fatal
    assert not any(n in program.stderr for n in LIBTPU_NOISE), program.stderr

    pci = "sys/bus/pci/devices/0000:00:04.0/vendor"
    roots = [_fake_root(tmp_path / "tpu", {pci: "0x1ae0"}),
             _fake_root(tmp_path / "gpu", {"dev/nvidia0": ""}), _fake_root(tmp_path / "cpu", {})]
    check = subprocess.run(
        [sys.executable, "-c", "import sys, jax; from hemnet_jax import accelerators as a\n"
         "for r in sys.argv[1:]: print(a.keep_tpu_plugin_off_without_tpu(r), "
         "jax.config.jax_platforms)", *roots],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert check.stdout.split("\n")[:3] == ["None None", "None None", "cpu cpu"], check.stderr
