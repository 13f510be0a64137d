"""The device mesh and the sharding rules every command shares (jax only).

One code path from one CPU to a TPU pod: a one-axis `jax.sharding.Mesh` over every device of every
host, batches split along its `data` axis, and train states replicated or FSDP-sharded by a rule on
each leaf's shape alone. `sync_hosts` is the barrier hosts meet at before reading what host 0 wrote.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_MIN_SIZE = 2**12  # leaves with fewer elements stay replicated under FSDP


def make_mesh() -> Mesh:
    """A one-axis mesh over every device of every host (data parallel, and FSDP when asked)."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split along their first (batch) axis over the mesh's data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Arrays held whole on every device of the mesh."""
    return NamedSharding(mesh, P())


def leaf_spec(shape: tuple[int, ...], mesh_size: int, fsdp: bool) -> P:
    """FSDP shards a leaf's largest axis divisible by the mesh; small leaves stay replicated."""
    if not fsdp or mesh_size == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % mesh_size == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool) -> Any:
    """NamedShardings for every leaf of a train state, decided by its shape alone."""
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, leaf_spec(leaf.shape, mesh.size, fsdp)), abstract_state
    )


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's part of the batch placed as one global array split along the data axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def sync_hosts(name: str) -> None:
    """A barrier across hosts named `name` (a no-op on one host)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
