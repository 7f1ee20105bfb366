"""Devices, processes and shardings: one `Mesh` over every device of every process.

The batch is sharded over the mesh's `data` axis; parameters and other state follow the rule
`config.train.state_sharding` ("replicated" today: a new rule, e.g. FSDP over `data`, is a new
case in `state_shardings` and a config value; the train step takes its shardings from the state).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
# Set by cluster launchers where jax.distributed.initialize() detects the processes by itself.
CLUSTER_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def initialize_distributed(
    coordinator_address: str = "",
    num_processes: int | None = None,
    process_id: int | None = None,
    force: bool = False,
) -> None:
    """Calls `jax.distributed.initialize` for multi-process runs.

    With an explicit coordinator (or `force`), or where JAX detects a cluster (Cloud TPU pod
    slices, SLURM, Open MPI), every process joins one global device set. On CPU the cross-process
    collectives use gloo. A single-process run with nothing set does nothing.
    """
    explicit = bool(coordinator_address) or num_processes is not None or process_id is not None
    detected = any(v in os.environ for v in CLUSTER_ENV_VARS)
    if not (explicit or force or detected):
        return
    # Only the CPU backend reads this; GPU and TPU keep their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address or None,
        num_processes=num_processes,
        process_id=process_id,
    )
    logging.info(
        "Process %d of %d; %d local and %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process) named `data`."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(tree, mesh: Mesh, rule: str = "replicated"):
    """Shardings for parameters, optimiser state, statistics and bases (a tree like `tree`)."""
    if rule != "replicated":
        raise ValueError(f"Unknown state sharding rule {rule!r}; known: 'replicated'.")
    return jax.tree.map(lambda _: replicated(mesh), tree)


def per_process_batch_size(
    global_batch_size: int, mesh: Mesh, process_index: int | None = None
) -> int:
    """The share of the global batch that a process (default: this one) feeds; it must divide
    evenly."""
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        raise ValueError(
            f"The global batch size {global_batch_size} must be a multiple of the number of "
            f"devices ({num_devices}): set --config.train.batch_size (or eval.batch_size) to one."
        )
    index = jax.process_index() if process_index is None else process_index
    local = sum(d.process_index == index for d in mesh.devices.flat)
    return global_batch_size // num_devices * local


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's share of the batch into global arrays sharded over `data`."""
    sharding = batch_sharding(mesh)
    num_local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    out = {}
    for name, array in local.items():
        if array.dtype.kind in "OSU":  # ids and other strings stay on the host
            continue
        global_shape = (array.shape[0] * mesh.devices.size // num_local,) + array.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, array, global_shape)
    return out
