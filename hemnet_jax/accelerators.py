"""Which accelerators this host may have, and the programs' start-up rule that follows from it.

With libtpu installed (it is in requirements-test.txt, for `python -m hemnet_jax.plan`), JAX's
default platform search initialises the TPU backend first, even on a host without a TPU: libtpu
prints its initialisation errors and JAX falls back to the CPU seconds later. Every program of
this project calls `keep_tpu_plugin_off_without_tpu` (`cli.run`) before JAX initialises its
backends: on a host with no TPU and no GPU it restricts JAX to the CPU. A TPU VM, a GPU host, or
an explicit JAX_PLATFORMS is left to JAX.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import jax

GOOGLE_PCI_VENDOR = "0x1ae0"  # what JAX's own TPU VM detection (jax._src.hardware_utils) reads
TPU_DEVICE_FILES = ("dev/accel*", "dev/vfio/[0-9]*")  # v4, v5e, v6e chips; v5p and later
GPU_DEVICE_FILES = ("dev/nvidia[0-9]*", "dev/nvidiactl", "dev/dxg", "dev/kfd")


def host_may_have_tpu(root: str = "/") -> bool:
    """True where a TPU chip may be attached: a Google PCI device (JAX's own test) or TPU device
    files. `root`: the file system's root (tests pass a fake one)."""
    for vendor in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return _any_file(root, TPU_DEVICE_FILES)


def host_may_have_gpu(root: str = "/") -> bool:
    """True where NVIDIA (or WSL2, AMD) GPU device files exist."""
    return _any_file(root, GPU_DEVICE_FILES)


def keep_tpu_plugin_off_without_tpu(root: str = "/") -> str | None:
    """Before JAX initialises its backends: where JAX_PLATFORMS is unset and this host has no
    TPU and no GPU, restricts JAX to the CPU, so an installed libtpu is never probed.
    Returns the platforms it set (None: it left JAX alone)."""
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return None
    if host_may_have_tpu(root) or host_may_have_gpu(root):
        return None
    jax.config.update("jax_platforms", "cpu")
    return "cpu"


def _any_file(root: str, patterns: Sequence[str]) -> bool:
    return any(glob.glob(os.path.join(root, p)) for p in patterns)
