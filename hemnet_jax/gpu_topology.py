"""NVIDIA H100 hosts without a GPU: compile-only CUDA devices from JAX's CUDA plugin.

`compile_only_devices(parse_gpu_topology("h100:8"))` asks the CUDA PJRT plugin
(jax-cuda12-plugin, no GPU, driver or CUDA library needed) for the devices of one host with 8
H100 SXM GPUs, described by a target description (`H100_SXM`: NVIDIA's published figures for
the H100 SXM5 80GB, in the form XLA's GpuTargetConfigProto takes). Programs compiled for them
go through XLA's GPU compiler and buffer assignment, as on the GPU, but two choices that a
real GPU makes by measuring are fixed instead: no autotuning (`--xla_gpu_autotune_level=0`: the
default conv and GEMM algorithms, so cuDNN's workspaces may differ from a real run's) and no
Triton GEMM fusions (`--xla_gpu_enable_triton_gemm=false`: with them, XLA 0.10.2's Triton tiling
fails a check on the HEM unit's [N, K] matmuls when compiling without a device). The GPU
compiler gives no cost analysis this way: no FLOPs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax

from hemnet_jax.errors import UserError

GPU_KINDS = {"h100": "NVIDIA H100 80GB HBM3"}
GPUS_PER_HOST = (1, 2, 4, 8)
KNOWN_GPU_TOPOLOGIES = tuple(f"{kind}:{n}" for kind in GPU_KINDS for n in GPUS_PER_HOST)
PLUGIN_REQUIREMENT = "jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2"
COMPILE_FLAGS = ("--xla_gpu_autotune_level=0", "--xla_gpu_enable_triton_gemm=false")

# H100 SXM5 80GB (NVIDIA's data sheet and CUDA's device properties for compute capability 9.0):
# 132 SMs, 1.98 GHz boost clock, 3.35 TB/s HBM3, 50 MiB L2, 228 KiB shared memory per SM (227
# per block opted in), 79.1 GiB of device memory as the driver reports it.
H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
H100_MEMORY_BYTES = 84942979072


class UnknownGpuTopologyError(ValueError, UserError):
    """--topology names no GPU host this module knows."""


class CudaPluginMissingError(ImportError, UserError):
    """JAX's CUDA plugin (the GPU compiler) is not installed."""


@dataclasses.dataclass(frozen=True)
class GpuTopology:
    """One host with `chips` GPUs of `generation` ("h100:8")."""

    name: str
    generation: str
    chips: int
    hosts: int = 1

    @property
    def hbm_bytes_per_chip(self) -> int:
        """The whole device memory. JAX preallocates 75% of it by default
        (XLA_PYTHON_CLIENT_MEM_FRACTION raises that)."""
        return H100_MEMORY_BYTES


def is_gpu_topology(name: str) -> bool:
    return name.strip().lower().partition(":")[0] in GPU_KINDS


def parse_gpu_topology(name: str) -> GpuTopology:
    """`GpuTopology` of "h100:N" (N GPUs on one host, N in GPUS_PER_HOST)."""
    kind, _, count = name.strip().lower().partition(":")
    if kind not in GPU_KINDS or not count.isdigit() or int(count) not in GPUS_PER_HOST:
        raise UnknownGpuTopologyError(
            f"--topology {name!r}: not a GPU host this command knows. Known: "
            f"{', '.join(KNOWN_GPU_TOPOLOGIES)}."
        )
    return GpuTopology(f"{kind}:{count}", kind, int(count))


def require_cuda_plugin() -> None:
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        raise CudaPluginMissingError(
            "JAX's CUDA plugin is not installed, so there is no GPU compiler to plan with: "
            f"pip install {PLUGIN_REQUIREMENT} (no GPU or CUDA library needed), then run again."
        )


def compile_only_devices(topology: GpuTopology) -> list[jax.Device]:
    """The host's compile-only CUDA devices (no GPU needed). Sets COMPILE_FLAGS in XLA_FLAGS,
    which the plugin reads when it first compiles."""
    from jax.experimental import topologies

    require_cuda_plugin()
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join([*flags, *(f for f in COMPILE_FLAGS if f not in flags)])
    desc = topologies.get_topology_desc(
        platform="cuda", topology_name=topology.name, target_config=H100_SXM,
        topology=f"1x1x{topology.chips}",
    )
    return list(desc.devices)
