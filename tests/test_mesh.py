"""The shared mesh: (data, fsdp) axes over every device, the FSDP rule, batches split over both."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from es_jax import mesh
from es_jax.commands.command_line import mesh_settings


def test_default_mesh_spans_every_device_along_data():
    devices = mesh.from_config(mesh_settings())
    assert devices.axis_names == mesh.MESH_AXES
    assert dict(devices.shape) == {"data": jax.device_count(), "fsdp": 1} == {"data": 8, "fsdp": 1}


@pytest.mark.parametrize(("data", "fsdp", "shape"), [(4, 2, (4, 2)), (-1, 2, (4, 2)),
                                                     (2, -1, (2, 4)), (1, -1, (1, 8))])
def test_mesh_shape_fills_the_axis_left_at_minus_one(data, fsdp, shape):
    assert tuple(mesh.mesh_shape(data, fsdp, 8)) == shape
    assert tuple(mesh.make_mesh(data, fsdp).devices.shape) == shape


@pytest.mark.parametrize(("data", "fsdp"), [(3, 2), (-1, 3), (-1, -1), (0, -1), (16, 1)])
def test_a_mesh_that_is_not_the_device_count_names_the_config_keys(data, fsdp):
    with pytest.raises(ValueError, match=r"config\.mesh"):
        mesh.mesh_shape(data, fsdp, 8)


def test_fsdp_shards_the_largest_divisible_axis():
    assert mesh.leaf_spec((1000, 64), 8) == P("fsdp", None)
    assert mesh.leaf_spec((30, 256), 8) == P(None, "fsdp")
    assert mesh.leaf_spec((1001, 63), 8) == P()
    assert mesh.leaf_spec((1000, 64), 1) == P()


def test_fsdp_replicates_small_leaves():
    assert mesh.leaf_spec((16,), 8) == P()
    assert mesh.leaf_spec((8, 511), 8) == P()  # 4088 < 4096 elements
    assert mesh.leaf_spec((8, 512), 8) == P(None, "fsdp")


def test_state_shardings_follow_each_leaf_shape_and_skip_none():
    devices = mesh.make_mesh(4, 2)
    abstract = {"kernel": jax.ShapeDtypeStruct((64, 1024), np.float32),
                "bias": jax.ShapeDtypeStruct((1024,), np.float32), "head": None}
    shardings = mesh.state_shardings(abstract, devices)
    assert shardings["kernel"].spec == P(None, "fsdp")
    assert shardings["bias"].spec == P()
    assert shardings["head"] is None


def test_shard_places_values_unchanged():
    devices = mesh.make_mesh(4, 2)
    host = {"kernel": np.arange(64 * 128, dtype=np.float32).reshape(64, 128),
            "levels": np.arange(64 * 128, dtype=np.uint8).reshape(64, 128)}
    placed = mesh.shard(host, devices)
    for name, array in placed.items():
        assert array.sharding.spec == P(None, "fsdp")
        assert {shard.data.shape for shard in array.addressable_shards} == {(64, 64)}
        np.testing.assert_array_equal(np.asarray(array), host[name])


def test_global_batch_is_split_over_every_device():
    devices = mesh.make_mesh(4, 2)
    local = {"input_ids": np.arange(16 * 4, dtype=np.int32).reshape(16, 4),
             "maskable": np.ones((16, 4), bool)}
    placed = mesh.global_batch(local, mesh.batch_sharding(devices))
    for name, array in placed.items():
        assert array.shape == local[name].shape
        assert array.sharding.spec == P(mesh.MESH_AXES)
        shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start)
        assert [shard.data.shape for shard in shards] == [(2, 4)] * 8
        assert {shard.device for shard in shards} == set(jax.devices())
        np.testing.assert_array_equal(np.concatenate([s.data for s in shards]), local[name])


def test_sync_hosts_is_a_no_op_on_one_host():
    assert jax.process_count() == 1
    mesh.sync_hosts("test")
