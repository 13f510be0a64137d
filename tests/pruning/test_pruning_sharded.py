"""Pruning sharded parameters on 8 CPU devices gives the same masks, without gathering them."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from es_jax import pruning


def test_sharded_masks_equal_unsharded_masks():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host CPU devices"
    rng = np.random.default_rng(0)
    params = {f"layer{i}": {"kernel": jnp.asarray(rng.integers(-20, 20, (64, 48)) / 7, jnp.float32),
                            "bias": jnp.zeros(48)} for i in range(3)}
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    kernel_sharding = NamedSharding(mesh, PartitionSpec("data", "model"))
    sharded = jax.tree.map(lambda x: jax.device_put(x, kernel_sharding) if x.ndim == 2
                           else jax.device_put(x, NamedSharding(mesh, PartitionSpec())), params)
    levels = [0.2, 0.5, 0.9]
    prune = jax.jit(lambda p: pruning.omp(p, levels, where=r".*kernel"))
    sharded_pruned, sharded_masks = prune(sharded)
    plain_pruned, plain_masks = pruning.omp(params, levels, where=r".*kernel")
    jax.tree.map(np.testing.assert_array_equal, sharded_masks, plain_masks)
    jax.tree.map(np.testing.assert_array_equal, sharded_pruned, plain_pruned)
    kernel_mask = sharded_masks[1]["layer0"]["kernel"]
    assert len(kernel_mask.sharding.device_set) == 8
    nm = jax.jit(lambda p: pruning.n_of_m(pruning.magnitude(p, r".*kernel"), 2, 4))(sharded)
    jax.tree.map(np.testing.assert_array_equal, nm,
                 pruning.n_of_m(pruning.magnitude(params, r".*kernel"), 2, 4))
