"""Runs of several JAX processes on this machine (2 hosts of 2 CPU devices, jax.distributed over
127.0.0.1, gloo collectives) equal the run of one process holding the same 4 devices, and a
killed group resumes from its last checkpoint to the result of the uninterrupted run."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from launcher import Layout, finish, kill, run, start, wait_until

from es_jax.train import checkpointing

REPOSITORY = Path(__file__).parents[2]
SMOKE = str(REPOSITORY / "configs" / "pretrain_smoke.py")
SWEEP = str(Path(__file__).with_name("sweep_tiny.py"))
STEPS = 30  # the smoke run's; checkpoints at 0, 1, 3, 10, 20, 30
TIMEOUT = 300.0


def pretrain(workdir: Path) -> list[str]:
    """The `es-jax pretrain` command of the `:tiny` (smoke) MLM run."""
    return ["pretrain", "--config", SMOKE, "--workdir", str(workdir)]


def final_state(workdir: Path) -> dict:
    """The last checkpoint's whole train state, as host numpy arrays."""
    return checkpointing.read_state(workdir / checkpointing.CHECKPOINT_DIR, STEPS)


def logged(workdir: Path) -> list[dict]:
    """The metrics host 0 logged at each checkpoint."""
    return [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]


def leaves(state: dict) -> list[tuple[str, np.ndarray]]:
    """(path, array) of every leaf of a train state."""
    return [(jax.tree_util.keystr(path), np.asarray(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)]


@pytest.fixture(scope="module")
def compilations(tmp_path_factory) -> Path:
    """The JAX compilation cache of this module's runs."""
    return tmp_path_factory.mktemp("compilations")


@pytest.fixture(scope="module")
def one_host(tmp_path_factory, compilations) -> Path:
    """The workdir of the smoke run on one process of 4 CPU devices."""
    workdir = tmp_path_factory.mktemp("one_host")
    run(pretrain(workdir / "run"), Layout(1, 4, workdir / "logs", compilations), TIMEOUT)
    return workdir / "run"


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, compilations) -> Path:
    """The workdir of the smoke run on 2 processes of 2 CPU devices each."""
    workdir = tmp_path_factory.mktemp("two_hosts")
    run(pretrain(workdir / "run"), Layout(2, 2, workdir / "logs", compilations), TIMEOUT)
    return workdir / "run"


def test_pretraining_on_two_hosts_equals_one_host_with_their_devices(one_host, two_hosts):
    # Every host tokenised its own devices' document streams: together the one host's.
    cache = lambda run: sorted(p.name for p in (run / "token_cache").iterdir())
    assert len(cache(two_hosts)) == 4
    assert cache(two_hosts) == cache(one_host)
    # The same batches: the same tokens predicted at every logged step, and the same losses up to
    # the order in which the devices' gradients are summed.
    one, two = logged(one_host), logged(two_hosts)
    assert [r["step"] for r in two] == [1, 3, 10, 20, 30]
    assert [r["predicted_tokens"] for r in two] == [r["predicted_tokens"] for r in one]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-6)
    expected, state = leaves(final_state(one_host)), leaves(final_state(two_hosts))
    assert [path for path, _ in state] == [path for path, _ in expected]
    for (path, got), (_, want) in zip(state, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=path)
    assert any(np.abs(want).max() > 0.01 for _, want in expected)  # not a vacuous comparison


def test_a_killed_group_resumes_from_its_last_checkpoint_to_the_same_result(
    two_hosts, compilations, tmp_path
):
    workdir = tmp_path / "run"
    checkpoints = workdir / checkpointing.CHECKPOINT_DIR
    layout = Layout(2, 2, tmp_path / "logs", compilations)
    hosts = start(pretrain(workdir), layout)
    wait_until(lambda: (checkpoints / "3" / "commit_success.txt").exists(), hosts, TIMEOUT)
    kill(hosts)  # the whole process group, SIGKILL, just after step 3's checkpoint completed
    assert not (workdir / "results.json").exists()
    finish(start(pretrain(workdir), layout), TIMEOUT)
    summary = json.loads((workdir / "results.json").read_text())
    assert 3 <= summary["resumed_from"] < STEPS
    expected = leaves(final_state(two_hosts))
    for (path, got), (_, want) in zip(leaves(final_state(workdir)), expected, strict=True):
        assert got.tobytes() == want.tobytes(), path


def sweep_values(workdir: Path) -> dict[str, list[float]]:
    """Each run of a finished sweep's results: the value measured at every level."""
    results = json.loads((workdir / "results.json").read_text())
    return {r["id"]: [level["value"] for level in r["levels"]] for r in results["runs"]}


def test_a_sweep_on_two_hosts_equals_the_sweep_on_one(compilations, tmp_path):
    data_dir = tmp_path / "data"  # the local data sets are built once, by the first sweep
    command = lambda name: ["sweep", "--config", SWEEP, "--workdir", str(tmp_path / name),
                            f"--config.data_dir={data_dir}"]
    run(command("one_host"), Layout(1, 4, tmp_path / "logs_one", compilations), TIMEOUT)
    run(command("two_hosts"), Layout(2, 2, tmp_path / "logs_two", compilations), TIMEOUT)
    one, two = sweep_values(tmp_path / "one_host"), sweep_values(tmp_path / "two_hosts")
    assert set(one) == {"minilm|lee|global|magnitude"}
    assert set(two) == set(one)
    for run_id, values in one.items():
        assert len(values) == 2
        np.testing.assert_allclose(two[run_id], values, rtol=1e-5, err_msg=run_id)
