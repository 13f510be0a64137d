"""Reading finished runs (runs under a folder, their steps, config and params as host numpy) and
the checksums that let a reader tell a checkpoint altered after saving."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from grain import checkpoint as grain_checkpoint

from es_jax.train import checkpointing


def write_run(run_dir, steps, config=None) -> None:
    """A run with a small train state saved at `steps` (and its config.json when given)."""
    manager = checkpointing.open_manager(checkpointing.checkpoint_dir(run_dir), async_save=False)
    for step in steps:
        params = {"dense": {"kernel": jnp.full((2, 3), float(step)), "bias": jnp.zeros(3)}}
        state = {"params": params, "step": jnp.asarray(step, jnp.int32)}
        checkpointing.save(manager, step, state, {"position": step})
    manager.close()
    if config is not None:
        (run_dir / checkpointing.CONFIG_FILE).write_text(json.dumps(config))


def test_a_run_folder_is_its_own_run(tmp_path):
    write_run(tmp_path, [0])
    assert checkpointing.find_runs(tmp_path) == [tmp_path]


def test_runs_of_a_folder_come_in_natural_order(tmp_path):
    for name in ("data_100", "data_60", "notes"):
        (tmp_path / name).mkdir()
    for name in ("data_100", "data_60"):
        write_run(tmp_path / name, [0])
    assert checkpointing.find_runs(tmp_path) == [tmp_path / "data_60", tmp_path / "data_100"]


def test_a_folder_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no checkpoints"):
        checkpointing.find_runs(tmp_path)


def test_an_opened_run_reads_its_steps_config_and_params(tmp_path):
    write_run(tmp_path, [10, 0, 5], config={"data": {"fraction": 0.6}})
    run = checkpointing.open_run(tmp_path)
    assert run.directory == tmp_path
    assert run.steps == [0, 5, 10]
    assert run.config == {"data": {"fraction": 0.6}}
    params = run.read_params(5)
    assert isinstance(params["dense"]["kernel"], np.ndarray)
    np.testing.assert_array_equal(params["dense"]["kernel"], np.full((2, 3), 5.0))


def test_a_run_without_a_stored_config_has_an_empty_one(tmp_path):
    write_run(tmp_path, [0])
    assert checkpointing.open_run(tmp_path).config == {}


def test_a_run_without_a_complete_checkpoint_is_refused(tmp_path):
    checkpointing.checkpoint_dir(tmp_path).mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        checkpointing.open_run(tmp_path)


def random_state(step: int) -> dict:
    """A train state with a 64x64 kernel of random weights, large enough to hold array data."""
    kernel = jax.random.normal(jax.random.key(step), (64, 64))
    return {"params": {"dense": {"kernel": kernel, "bias": jnp.zeros(64)}},
            "step": jnp.asarray(step, jnp.int32)}


def save_states(directory, steps) -> None:
    """Saves `random_state(step)` at each step, with its checksums."""
    manager = checkpointing.open_manager(directory, async_save=False)
    for step in steps:
        checkpointing.save(manager, step, random_state(step), {"position": step})
    manager.close()


def abstract(state: dict) -> dict:
    """Shapes, dtypes and a one-device placement of every leaf: what restoring asks for."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def test_altered_array_bytes_make_a_checkpoint_unreadable(tmp_path, flip_bytes):
    directory = checkpointing.checkpoint_dir(tmp_path)
    save_states(directory, [0, 5])
    flip_bytes(directory / "5")
    run = checkpointing.open_run(tmp_path)
    np.testing.assert_array_equal(run.read_params(0)["dense"]["kernel"],
                                  random_state(0)["params"]["dense"]["kernel"])
    with pytest.raises(checkpointing.UnreadableCheckpoint,
                       match=r"checkpoints/5 could not be read \(checksum mismatch: params/dense/"):
        run.read_params(5)


def test_restoring_moves_an_altered_checkpoint_aside_and_takes_the_one_before(tmp_path, flip_bytes):
    directory = checkpointing.checkpoint_dir(tmp_path)
    save_states(directory, [0, 5, 10])
    flip_bytes(directory / "10")
    manager = checkpointing.open_manager(directory, async_save=False)
    with pytest.warns(UserWarning, match=r"checkpoints/10 could not be read \(checksum mismatch"):
        step, state, data_state = checkpointing.restore_latest(manager, abstract(random_state(0)))
    manager.close()
    assert (step, data_state) == (5, {"position": 5})
    np.testing.assert_array_equal(state["params"]["dense"]["kernel"],
                                  random_state(5)["params"]["dense"]["kernel"])
    assert (tmp_path / checkpointing.CORRUPT_DIR / "10").exists()


def test_checkpoints_saved_without_checksums_restore_unchecked(tmp_path):
    directory = checkpointing.checkpoint_dir(tmp_path)
    manager = ocp.CheckpointManager(directory, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "data": grain_checkpoint.CheckpointHandler()})
    manager.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave(random_state(3)),
        data=grain_checkpoint.CheckpointSave(checkpointing.IteratorStateSnapshot({"position": 3}))))
    manager.close()
    manager = checkpointing.open_manager(directory, async_save=False)
    step, _, _ = checkpointing.restore_latest(manager, abstract(random_state(0)))
    manager.close()
    assert step == 3
    np.testing.assert_array_equal(checkpointing.open_run(tmp_path).read_params(3)["dense"]["kernel"],
                                  random_state(3)["params"]["dense"]["kernel"])


def mixed_state() -> dict:
    """Leaves of every width a train state holds: float32, bfloat16, int32, bool, a scalar."""
    rng = np.random.default_rng(0)
    return {"kernel": rng.normal(size=(64, 128)).astype(np.float32),
            "half": rng.normal(size=(128, 64)).astype(jnp.bfloat16),
            "key": rng.integers(0, 2**31, size=(4,), dtype=np.int64).astype(np.uint32),
            "flags": rng.random((16, 8)) > 0.5, "step": np.int32(7)}


def test_checksums_do_not_depend_on_devices_or_sharding():
    from es_jax.mesh import make_mesh, state_shardings

    host = mixed_state()
    sharded = jax.device_put(host, state_shardings(host, make_mesh(data=1, fsdp=-1)))
    assert not sharded["kernel"].sharding.is_fully_replicated
    assert checkpointing.state_checksums(sharded) == checkpointing.state_checksums(host)


@pytest.mark.parametrize("leaf", ["kernel", "half", "key", "flags", "step"])
def test_one_changed_or_moved_value_changes_its_leafs_checksum_only(leaf):
    original = mixed_state()
    before = checkpointing.state_checksums(original)
    changed = jax.tree.map(np.copy, original)
    flat = changed[leaf].reshape(-1)
    flat[-1] = ~flat[-1] if flat.dtype == bool else flat[-1] + 1
    after = checkpointing.state_checksums(changed)
    assert {path for path in before if before[path] != after[path]} == {leaf}
    if flat.size > 1 and flat[0] != flat[-1]:  # the same values in another order
        moved = jax.tree.map(np.copy, original)
        moved[leaf].reshape(-1)[[0, -1]] = moved[leaf].reshape(-1)[[-1, 0]]
        assert checkpointing.state_checksums(moved)[leaf] != before[leaf]


HOST_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from es_jax.mesh import make_mesh, state_shardings
from es_jax.train import checkpointing
host = {"kernel": np.random.default_rng(0).normal(size=(64, 128)).astype(np.float32)}
shardings = state_shardings(host, make_mesh(data=1, fsdp=-1))
state = {k: jax.make_array_from_callback(v.shape, shardings[k], lambda i, v=v: v[i])
         for k, v in host.items()}
assert not state["kernel"].is_fully_addressable  # each host holds half of it
print(json.dumps(checkpointing.state_checksums(state)))
"""


def test_every_host_computes_the_checksums_of_the_whole_arrays():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    hosts = [subprocess.Popen([sys.executable, "-c", HOST_SCRIPT, address, str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [host.communicate(timeout=300) for host in hosts]
    assert all(host.returncode == 0 for host in hosts), outputs[0][1][-2000:]
    whole = {"kernel": np.random.default_rng(0).normal(size=(64, 128)).astype(np.float32)}
    for stdout, _ in outputs:
        assert json.loads(stdout.strip().splitlines()[-1]) == checkpointing.state_checksums(whole)
