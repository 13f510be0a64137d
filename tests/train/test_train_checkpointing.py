"""Reading finished runs (runs under a folder, their steps, config and params as host numpy), the
checksums that let a reader tell a checkpoint altered after saving, the steps Orbax's save policy
writes (scheduled and preempted), paths that stay `gs://` URLs, and hosts that agree on which
checkpoint to restore and which to move aside."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from fake_bucket import local_buckets
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils

from es_jax.train import checkpointing


def write_run(run_dir, steps, config=None) -> None:
    """A run with a small train state saved at `steps` (and its config.json when given)."""
    manager = checkpointing.open_manager(checkpointing.checkpoint_dir(run_dir), async_save=False)
    for step in sorted(steps):  # Orbax saves only steps newer than the newest saved
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
    directory = tmp_path / checkpointing.CHECKPOINT_DIR
    save_states(directory, [0, 5])
    flip_bytes(directory / "5")
    run = checkpointing.open_run(tmp_path)
    np.testing.assert_array_equal(run.read_params(0)["dense"]["kernel"],
                                  random_state(0)["params"]["dense"]["kernel"])
    with pytest.raises(checkpointing.UnreadableCheckpoint,
                       match=r"checkpoints/5 could not be read \(checksum mismatch: params/dense/"):
        run.read_params(5)


def test_restoring_moves_an_altered_checkpoint_aside_and_takes_the_one_before(tmp_path, flip_bytes):
    directory = tmp_path / checkpointing.CHECKPOINT_DIR
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
    directory = tmp_path / checkpointing.CHECKPOINT_DIR
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
    whole = {"kernel": np.random.default_rng(0).normal(size=(64, 128)).astype(np.float32)}
    for line in run_hosts(HOST_SCRIPT):
        assert json.loads(line) == checkpointing.state_checksums(whole)


def saved_steps(directory) -> list[int]:
    """The step directories on disk, ascending."""
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_orbax_saves_the_scheduled_steps_and_the_step_a_preemption_names(tmp_path, monkeypatch):
    # jax.distributed's preemption service names step 5 as the sync point on every host.
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step == 5)
    manager = checkpointing.open_manager(tmp_path, async_save=False, save_steps=[0, 3, 7])
    written = [step for step in range(9)
               if checkpointing.save(manager, step, random_state(step), {"position": step})]
    manager.close()
    assert written == [0, 3, 5, 7]
    assert saved_steps(tmp_path) == [0, 3, 5, 7]


def test_without_a_schedule_every_newer_step_is_saved_and_no_older_one(tmp_path):
    manager = checkpointing.open_manager(tmp_path, async_save=False)
    written = [checkpointing.save(manager, step, random_state(step), None) for step in (2, 4, 3)]
    manager.close()
    assert written == [True, True, False]
    assert saved_steps(tmp_path) == [2, 4]


@pytest.mark.parametrize(("given", "expected"), [
    ("gs://bucket/runs/a", "gs://bucket/runs/a"),
    ("gs://bucket", "gs://bucket"),
    ("s3://bucket/x/", "s3://bucket/x"),
])
def test_a_bucket_url_keeps_both_slashes(given, expected):
    path = checkpointing.as_path(given)
    assert isinstance(path, epath.Path)
    assert checkpointing.is_url(given)
    assert os.fspath(path) == expected
    assert os.fspath(path / checkpointing.CHECKPOINT_DIR / "10") == f"{expected}/checkpoints/10"


def test_a_local_path_is_made_absolute_with_its_home_expanded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert not checkpointing.is_url("runs/a")
    assert checkpointing.as_path("runs/a") == tmp_path / "runs" / "a"
    assert checkpointing.as_path("~/runs") == tmp_path / "home" / "runs"


def test_checkpoints_in_a_bucket_save_restore_and_move_aside_through_gs_urls(tmp_path, monkeypatch):
    bucket_root, elsewhere = tmp_path / "buckets", tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a URL that lost a slash would land here, as gs:/bucket/...
    with local_buckets(bucket_root):
        save_states("gs://bucket/run/checkpoints", [0, 5, 10])
        on_disk = bucket_root / "bucket" / "run" / "checkpoints"
        assert saved_steps(on_disk) == [0, 5, 10]
        assert (on_disk / "10" / "commit_success.txt").exists()  # Orbax's Cloud Storage commit
        for data_file in (on_disk / "10" / "state" / "d").iterdir():
            data_file.write_bytes(data_file.read_bytes()[:7])  # cut short
        manager = checkpointing.open_manager("gs://bucket/run/checkpoints", async_save=False)
        with pytest.warns(UserWarning, match=r"gs://bucket/run/checkpoints/10 could not be read.*"
                                             r"moved it to gs://bucket/run/corrupt_checkpoints/10"):
            step, state, _ = checkpointing.restore_latest(manager, abstract(random_state(0)))
        manager.close()
        assert step == 5
        runs = checkpointing.find_runs("gs://bucket")
        assert [os.fspath(run) for run in runs] == ["gs://bucket/run"]
        params = checkpointing.open_run(runs[0]).read_params(5)
    assert saved_steps(on_disk) == [0, 5]
    assert saved_steps(bucket_root / "bucket" / "run" / checkpointing.CORRUPT_DIR) == [10]
    assert list(elsewhere.iterdir()) == []
    expected = random_state(5)["params"]["dense"]["kernel"]
    np.testing.assert_array_equal(state["params"]["dense"]["kernel"], expected)
    np.testing.assert_array_equal(params["dense"]["kernel"], expected)


@pytest.mark.parametrize(("readable", "expected"), [
    ([True], checkpointing.Verdict.READABLE),
    ([False], checkpointing.Verdict.UNREADABLE),
    ([True, True, True], checkpointing.Verdict.READABLE),
    ([False, False, False], checkpointing.Verdict.UNREADABLE),
    ([True, False, True], checkpointing.Verdict.DISPUTED),
    ([False, True], checkpointing.Verdict.DISPUTED),
])
def test_a_checkpoint_is_unreadable_only_when_no_host_reads_it(readable, expected):
    assert checkpointing.verdict(readable) is expected


def test_a_verdict_needs_at_least_one_host():
    with pytest.raises(ValueError, match="at least one host"):
        checkpointing.verdict([])


@pytest.mark.parametrize(("steps", "below", "expected"), [
    ([0, 10, 5], None, 10), ([0, 10, 5], 10, 5), ([0, 10, 5], 7, 5), ([0, 10, 5], 0, None),
    ([], None, None),
])
def test_the_next_step_to_try_is_the_newest_below_the_last_tried(steps, below, expected):
    assert checkpointing.newest_below(steps, below) == expected


DISAGREEING_HOSTS_SCRIPT = """
import json, sys, warnings
from pathlib import Path
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from es_jax.mesh import make_mesh, state_shardings, sync_hosts
from es_jax.train import checkpointing
directory, host = Path(sys.argv[3]), jax.process_index()
shardings = state_shardings({"kernel": np.zeros((64, 128), np.float32)}, make_mesh(1, -1))
def state(step):
    return {"kernel": jax.make_array_from_callback(
        (64, 128), shardings["kernel"], lambda i: np.full((64, 128), step, np.float32)[i])}
manager = checkpointing.open_manager(directory, async_save=False)
for step in (0, 5, 10, 15):
    checkpointing.save(manager, step, state(step), {"host": host, "step": step})
sync_hosts("saved")
if host == 0:
    for data_file in (directory / "15" / "state").rglob("*"):
        if data_file.is_file() and data_file.parent.name == "d":
            data_file.write_bytes(data_file.read_bytes()[:7])  # no host can read step 15
    (directory / "10" / "data" / "process_1-of-2.json").write_text("{cut")  # only host 1 reads it
sync_hosts("damaged")
target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                      state(0))
assert not state(0)["kernel"].is_fully_addressable  # each host reads its half
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    step, restored, data_state = checkpointing.restore_latest(manager, target)
manager.close()
values = {float(v) for shard in restored["kernel"].addressable_shards
          for v in np.unique(shard.data)}
print(json.dumps({"step": step, "data": data_state, "values": sorted(values),
                  "warnings": [str(w.message) for w in caught if "Checkpoint" in str(w.message)]}))
"""


def run_hosts(script: str, *arguments: str) -> list[str]:
    """Runs `script` as two hosts of one jax.distributed run (4 CPU devices each, gloo); each
    host's last line of output, once both succeeded."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    hosts = [subprocess.Popen([sys.executable, "-c", script, address, str(i), *arguments],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [host.communicate(timeout=300) for host in hosts]
    for host, (_, stderr) in zip(hosts, outputs, strict=True):
        assert host.returncode == 0, stderr[-3000:]
    return [stdout.strip().splitlines()[-1] for stdout, _ in outputs]


def test_hosts_restore_the_same_step_and_move_aside_only_what_none_can_read(tmp_path):
    directory = tmp_path / checkpointing.CHECKPOINT_DIR
    reports = [json.loads(line) for line in run_hosts(DISAGREEING_HOSTS_SCRIPT, str(directory))]
    for host, report in enumerate(reports):
        assert report["step"] == 5
        assert report["data"] == {"host": host, "step": 5}
        assert report["values"] == [5.0]
        unreadable, disputed = report["warnings"]
        assert re.search(r"checkpoints/15 could not be read .*moved it to .*corrupt_checkpoints/15",
                         unreadable)
        assert re.search(r"checkpoints/10 was read by hosts \[0\] but not by hosts \[1\] "
                         r"\(this host (read it|could not: JSONDecodeError.*)\); left it in place",
                         disputed)
    assert "could not: JSONDecodeError" in reports[1]["warnings"][1]
    assert saved_steps(directory) == [0, 5, 10]
    assert saved_steps(tmp_path / checkpointing.CORRUPT_DIR) == [15]
