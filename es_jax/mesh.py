"""The device mesh and the sharding rules every command shares (jax only).

One code path from one CPU to a TPU pod: a two-axis `jax.sharding.Mesh` (`data`, `fsdp`) over every
device of every host. Batches are split over both axes (every device holds its own rows);
parameters, optimizer states, masks and pruning-level arrays are sharded along `fsdp` by a rule on
each leaf's shape alone (`leaf_spec`), so the same rule serves every model family. `fsdp=1` (the
default) replicates them: plain data parallelism. Commands read the mesh's shape from their config's
`mesh` keys (`data`, `fsdp`; -1 takes the devices the other axis leaves). `sync_hosts` is the
barrier hosts meet at before reading what host 0 wrote.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
FSDP_MIN_SIZE = 2**12  # leaves with fewer elements stay replicated under FSDP


class MeshShape(NamedTuple):
    """Devices along each mesh axis: `data` (batch only) and `fsdp` (batch and parameters)."""

    data: int
    fsdp: int


def mesh_shape(data: int, fsdp: int, device_count: int) -> MeshShape:
    """The mesh's shape for `device_count` devices; one of `data`, `fsdp` may be -1 (the rest).

    ValueError naming the `mesh` config keys when the sizes do not multiply to the device count.
    """
    if data == -1 and fsdp == -1:
        raise ValueError("config.mesh: at most one of mesh.data and mesh.fsdp may be -1.")
    if data == -1 or fsdp == -1:
        given = fsdp if data == -1 else data
        if given <= 0 or device_count % given:
            raise ValueError(
                f"config.mesh: {given} does not divide the {device_count} devices; set "
                f"mesh.data and mesh.fsdp to sizes whose product is {device_count}."
            )
        rest = device_count // given
        return MeshShape(rest, fsdp) if data == -1 else MeshShape(data, rest)
    if data <= 0 or fsdp <= 0 or data * fsdp != device_count:
        raise ValueError(
            f"config.mesh: data={data} x fsdp={fsdp} is not the {device_count} devices; set "
            "sizes whose product is the device count, or -1 for one of them."
        )
    return MeshShape(data, fsdp)


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """A (`data`, `fsdp`) mesh over every device of every host (see `mesh_shape`)."""
    shape = mesh_shape(data, fsdp, jax.device_count())
    devices = mesh_utils.create_device_mesh(tuple(shape), jax.devices())
    return Mesh(devices, MESH_AXES)


def from_config(settings: Any) -> Mesh:
    """The mesh a config's `mesh` keys (`data`, `fsdp`) describe."""
    return make_mesh(int(settings.data), int(settings.fsdp))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split along their first (batch) axis over all devices (both mesh axes)."""
    return NamedSharding(mesh, P(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Arrays held whole on every device of the mesh."""
    return NamedSharding(mesh, P())


def fsdp_size(mesh: Mesh) -> int:
    """Devices along the mesh's `fsdp` axis."""
    return int(mesh.shape[FSDP_AXIS])


def leaf_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """A leaf's largest axis divisible by `fsdp` sharded over the `fsdp` axis; leaves under
    FSDP_MIN_SIZE elements, or with no such axis, or `fsdp` == 1, replicated."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec: list[str | None] = [None] * len(shape)
            spec[axis] = FSDP_AXIS
            return P(*spec)
    return P()


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding for every array leaf of `tree` (arrays or ShapeDtypeStructs: parameters,
    optimizer states, masks, level arrays) by its shape alone; None leaves stay None."""
    return jax.tree.map(lambda leaf: NamedSharding(mesh, leaf_spec(leaf.shape, fsdp_size(mesh))),
                        tree)


def shard(tree: Any, mesh: Mesh) -> Any:
    """`tree` placed on the mesh by `state_shardings` (every host must pass the same values)."""
    return put(tree, state_shardings(tree, mesh))


def put(tree: Any, shardings: Any) -> Any:
    """Every leaf of `tree` placed as `shardings` says (one sharding for all, or a tree of them),
    also on a mesh that spans several hosts: there each host builds its own devices' shards from
    its copy of the values (which every host must hold alike), as `jax.device_put` cannot."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda leaf: _put_leaf(leaf, shardings), tree)
    return jax.tree.map(_put_leaf, tree, shardings)


def _put_leaf(leaf: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """One array placed as `sharding` (see `put`); PRNG key arrays through their key data."""
    global_already = isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
    if sharding.is_fully_addressable or global_already:
        return jax.device_put(leaf, sharding)
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = _put_leaf(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's part of the batch placed as one global array split along the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def sync_hosts(name: str) -> None:
    """A barrier across hosts named `name` (a no-op on one host)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
