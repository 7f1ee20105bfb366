"""`python -m hemnet_jax.plan`'s GPU route (`--topology h100:N`), through the real CLI
(`--train_only`: tests/test_plan.py's multi-host plan).

Compiling for an H100 needs JAX's CUDA plugin (jax-cuda12-plugin, 478 MB), which the test
environment does not install; benchmarks/README.md has the compiles made with it.
"""

import importlib.util
import sys

import pytest

from hemnet_jax import gpu_topology
from tests.test_user_errors import _env, _fatal, _run

PLAN = [sys.executable, "-m", "hemnet_jax.plan", "--config", "tests/tiny.py"]


def test_an_unknown_gpu_host_names_the_known_ones():
    message = _fatal(_run([*PLAN, "--topology", "h100:3"], _env()))
    assert "'h100:3'" in message and "h100:1, h100:2, h100:4, h100:8" in message


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is not None,
                    reason="JAX's CUDA plugin is installed here: nothing is missing")
def test_a_missing_cuda_plugin_says_how_to_install_it():
    message = _fatal(_run([*PLAN, "--topology", "h100:8"], _env()))
    assert f"pip install {gpu_topology.PLUGIN_REQUIREMENT}" in message


def test_gpu_hosts_parse():
    t = gpu_topology.parse_gpu_topology(" H100:8 ")
    assert (t.name, t.chips, t.hosts) == ("h100:8", 8, 1)
    assert t.hbm_bytes_per_chip == gpu_topology.H100_MEMORY_BYTES
    assert gpu_topology.is_gpu_topology("h100:4") and not gpu_topology.is_gpu_topology("v5e:2x4")
