"""The shared mesh: one data axis over every device, the FSDP rule, batches split along the axis."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from es_jax import mesh


def test_mesh_spans_every_device_on_one_data_axis():
    devices = mesh.make_mesh()
    assert devices.axis_names == (mesh.DATA_AXIS,)
    assert devices.size == jax.device_count() == 8


def test_fsdp_shards_the_largest_divisible_axis():
    assert mesh.leaf_spec((1000, 64), 8, fsdp=True) == P("data", None)
    assert mesh.leaf_spec((30, 256), 8, fsdp=True) == P(None, "data")
    assert mesh.leaf_spec((1001, 63), 8, fsdp=True) == P()
    assert mesh.leaf_spec((1000, 64), 8, fsdp=False) == P()
    assert mesh.leaf_spec((1000, 64), 1, fsdp=True) == P()


def test_fsdp_replicates_small_leaves():
    assert mesh.leaf_spec((16,), 8, fsdp=True) == P()
    assert mesh.leaf_spec((8, 511), 8, fsdp=True) == P()  # 4088 < 4096 elements
    assert mesh.leaf_spec((8, 512), 8, fsdp=True) == P(None, "data")


def test_state_shardings_follow_each_leaf_shape():
    devices = mesh.make_mesh()
    abstract = {"kernel": jax.ShapeDtypeStruct((64, 1024), np.float32),
                "bias": jax.ShapeDtypeStruct((1024,), np.float32)}
    shardings = mesh.state_shardings(abstract, devices, fsdp=True)
    assert shardings["kernel"].spec == P(None, "data")
    assert shardings["bias"].spec == P()


def test_global_batch_is_split_along_the_data_axis():
    devices = mesh.make_mesh()
    local = {"input_ids": np.arange(16 * 4, dtype=np.int32).reshape(16, 4),
             "maskable": np.ones((16, 4), bool)}
    placed = mesh.global_batch(local, mesh.batch_sharding(devices))
    for name, array in placed.items():
        assert array.shape == local[name].shape
        assert array.sharding.spec == P("data")
        shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start)
        assert [shard.data.shape for shard in shards] == [(2, 4)] * 8
        assert {shard.device for shard in shards} == set(jax.devices())
        np.testing.assert_array_equal(np.concatenate([s.data for s in shards]), local[name])


def test_sync_hosts_is_a_no_op_on_one_host():
    assert jax.process_count() == 1
    mesh.sync_hosts("test")
