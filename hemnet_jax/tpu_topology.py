"""Cloud TPU slices without a TPU: their names, chips, hosts and HBM, and compile-only devices.

`compile_only_devices("v5e:2x4")` asks libtpu (the TPU compiler, a pip package) for the slice's
devices: they carry the slice's process indices and compile programs for it, but never run one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

import jax

from hemnet_jax.accelerators import host_may_have_tpu
from hemnet_jax.errors import UserError

GIB = 2**30

# Chip generations: HBM per chip (Cloud TPU's published figures) and their documented slices.
# v5e and v6e slices of up to 8 chips are one host (v5litepod-8, v6e-8: 2x4 chips on one VM);
# larger ones, and every v4 and v5p slice, have 4 chips (2x2x1) per host.
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16")
SLICES = {"v4": _3D, "v5e": _2D, "v5p": _3D, "v6e": _2D}
# v4 and v5p chips have two TensorCores that JAX drives as one device (megacore), as on a TPU VM;
# libtpu's compile-only topology of v4 otherwise has a device per TensorCore (8 for v4:2x2x1,
# whose two halves of a chip would then be planned as two chips against one chip's HBM).
CHIP_CONFIG = {"v4": "megacore", "v5p": "megacore"}
KNOWN_TOPOLOGIES = tuple(f"{gen}:{shape}" for gen, shapes in SLICES.items() for shape in shapes)
LIBTPU_REQUIREMENT = "libtpu==0.0.42.*"  # the version jax[tpu] 0.10.2 pins
INSTALL_HINT = (
    f"pip install -r requirements-test.txt (or pip install '{LIBTPU_REQUIREMENT}', the version "
    "jax[tpu] pins), then run again"
)


class UnknownTopologyError(ValueError, UserError):
    """--topology names no Cloud TPU slice this module knows."""


class LibtpuMissingError(ImportError, UserError):
    """libtpu (the TPU compiler) is not installed."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A Cloud TPU slice: `name` "v5e:2x4", its chip grid and hosts."""

    name: str
    generation: str
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """The chip grid of one host (x, y, z), as libtpu takes it."""
        if self.generation in ("v5e", "v6e") and self.chips <= 8:
            return (*self.shape, 1)[:3]  # one host holds the whole slice
        return (2, 2, 1)

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host_bounds)

    @property
    def hbm_bytes_per_chip(self) -> int:
        return HBM_BYTES[self.generation]


def parse_topology(name: str) -> Topology:
    """`Topology` of a name in KNOWN_TOPOLOGIES ("v5e:2x4", "v4:2x2x4").

    Raises:
      UnknownTopologyError: any other name; the message lists the known ones.
    """
    generation, _, shape = name.strip().lower().partition(":")
    if shape not in SLICES.get(generation, ()):
        raise UnknownTopologyError(
            f"--topology {name!r}: not a Cloud TPU slice this command knows. Known: "
            f"{', '.join(KNOWN_TOPOLOGIES)}."
        )
    return Topology(f"{generation}:{shape}", generation, tuple(int(n) for n in shape.split("x")))


def require_libtpu() -> None:
    """Raises LibtpuMissingError unless JAX can find libtpu (its `libtpu` package, or the file
    TPU_LIBRARY_PATH names), the way JAX itself looks for it."""
    path = os.environ.get("TPU_LIBRARY_PATH", "")
    if path and os.path.isfile(path):
        return
    try:
        import libtpu  # noqa: F401  (late: 684 MB, only for compiling for a TPU)
    except ImportError as e:
        raise LibtpuMissingError(
            f"libtpu is not installed, so there is no TPU compiler to plan with: {INSTALL_HINT}."
        ) from e


def compile_only_devices(topology: Topology) -> list[jax.Device]:
    """The slice's compile-only TPU devices, from libtpu (seconds; no TPU needed).

    libtpu's start-up complains on stderr that it finds no TPU VM (no worker hostnames, no
    accelerator type): expected here, so that output is kept off the console and shown only if
    the topology cannot be built.
    """
    from jax.experimental import topologies

    require_libtpu()
    if not host_may_have_tpu():
        # libtpu takes /tmp/libtpu_lockfile so that one process owns a host's TPU chips; a host
        # without any has nothing to own, and plans (tests, tables) may compile side by side.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    with _stderr_captured() as captured:
        try:
            desc = topologies.get_topology_desc(
                topology_name=topology.name, platform="tpu",
                chips_per_host_bounds=list(topology.chips_per_host_bounds),
                **({"chip_config_name": CHIP_CONFIG[topology.generation]}
                   if topology.generation in CHIP_CONFIG else {}),
            )
        except Exception as e:
            raise RuntimeError(f"libtpu could not build {topology.name}: {e}\n"
                               f"{captured.read()}") from e
    if len(desc.devices) != topology.chips:  # one JAX device per chip, as on the slice itself
        raise RuntimeError(f"libtpu built {len(desc.devices)} devices for {topology.name}, "
                           f"which has {topology.chips} chips.")
    return list(desc.devices)


class _stderr_captured:
    """Redirects file descriptor 2 (C++ libraries' stderr) to a temporary file for a block."""

    def __enter__(self):
        self._file = tempfile.TemporaryFile(mode="w+")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def read(self) -> str:
        self._file.flush()
        self._file.seek(0)
        return self._file.read()

    def __exit__(self, *exc) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.close()
