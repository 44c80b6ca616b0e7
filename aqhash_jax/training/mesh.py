"""Multi-process start-up and the data-parallel device mesh.

The job runs data parallel over every device of every process: a 1-D `Mesh` over `jax.devices()`
with axis "data". Parameters and optimiser state are replicated, batches are split along their
first axis. Each process feeds only its own rows of a global batch, and
`jax.make_array_from_process_local_data` assembles the global array.

Several processes are started explicitly. `maybe_initialize_distributed` calls
`jax.distributed.initialize` when a coordinator address is given, through the flags
`--coordinator_address`, `--num_processes` and `--process_id` or the environment variables
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, or when
`--distributed=auto` asks JAX to detect the cluster (Cloud TPU pods, SLURM). With none of these,
the job is a single process.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto_detect: bool = False,
) -> bool:
    """Call `jax.distributed.initialize` when a multi-process run is requested.

    Arguments left as None are read from `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID`. Returns True when JAX was initialised for several processes. Raises
    ValueError when a coordinator address is given without the process count and id.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])

    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError(
                f"coordinator address {coordinator_address!r} given without the process count "
                "and id; pass --num_processes=N and --process_id=I (or set JAX_NUM_PROCESSES "
                "and JAX_PROCESS_ID)"
            )
        logging.info(
            "initialising jax.distributed: coordinator %s, process %d of %d",
            coordinator_address, process_id, num_processes,
        )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        return True

    if auto_detect:
        logging.info("initialising jax.distributed with cluster auto-detection")
        jax.distributed.initialize()
        return jax.process_count() > 1
    return False


def make_mesh() -> Mesh:
    """Return a 1-D mesh with axis "data" over all devices of all processes."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_global_batch_size(global_batch_size: int, what: str) -> int:
    """Return the per-process batch size, raising ValueError unless it divides evenly."""
    device_count = jax.device_count()
    if global_batch_size % device_count:
        raise ValueError(
            f"{what}={global_batch_size} is not divisible by the {device_count} devices of this "
            f"run ({jax.process_count()} processes); choose a multiple of {device_count}"
        )
    return global_batch_size // jax.process_count()


def process_rows(global_batch_size: int) -> slice:
    """Return the rows of a global batch that this process feeds."""
    local = global_batch_size // jax.process_count()
    start = jax.process_index() * local
    return slice(start, start + local)


def shard_batch(mesh: Mesh, local_batch: Any) -> Any:
    """Assemble global arrays sharded along "data" from this process's rows of a batch pytree."""
    sharding = batch_sharded(mesh)

    def to_global(value):
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        return jax.make_array_from_process_local_data(sharding, value, global_shape)

    return jax.tree_util.tree_map(to_global, local_batch)


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Place a host pytree (identical on every process) replicated on the mesh."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x)[index]),
        tree,
    )


def to_host(tree: Any) -> Any:
    """Copy a pytree of (possibly sharded, multi-process) arrays to numpy on every process."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
    return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str) -> None:
    """Wait until every process reaches this point (no-op for a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
