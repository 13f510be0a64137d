"""Pre-training resumes exactly after SIGKILL, a preemption or a corrupt checkpoint, and refuses
other configs."""

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from es_jax.analysis.plots import plot_training_loss
from es_jax.commands import command_line
from es_jax.train import checkpointing, pretrain

SMOKE = str(Path(__file__).parents[2] / "configs" / "pretrain_smoke.py")
TOTAL_STEPS = 30


def command(workdir: Path, *extra: str) -> list[str]:
    """The `es-jax pretrain` command line of the smoke run."""
    return [
        sys.executable, "-m", "es_jax.cli", "pretrain", "--config", SMOKE, "--workdir",
        str(workdir), *extra,
    ]


def final_state(workdir: Path) -> dict:
    """The last checkpoint's full train state as numpy arrays."""
    return checkpointing.read_state(workdir / checkpointing.CHECKPOINT_DIR, TOTAL_STEPS)


def assert_bitwise_equal(left: dict, right: dict) -> None:
    """Every leaf (params, optimizer state, step, RNG) has identical bits."""
    left_leaves = jax.tree_util.tree_leaves_with_path(left)
    right_leaves = jax.tree_util.tree_leaves_with_path(right)
    assert [p for p, _ in left_leaves] == [p for p, _ in right_leaves]
    for (path, a), (_, b) in zip(left_leaves, right_leaves, strict=True):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), jax.tree_util.keystr(path)
        assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, worker_id) -> tuple[Path, dict]:
    """An uninterrupted smoke run, made once per test session even under pytest-xdist.

    It runs in this process: same devices and flags as the subprocesses.
    """
    root = tmp_path_factory.getbasetemp()
    root = root if worker_id == "master" else root.parent  # shared by the xdist workers
    workdir = root / "pretrain_smoke_reference"
    with open(root / "pretrain_smoke_reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (workdir / "results.json").exists():
            argv = ["--config", SMOKE, "--workdir", str(workdir)]
            config, _ = command_line.parse("pretrain", argv)
            pretrain.train_and_evaluate(config, workdir)
    return workdir, final_state(workdir)


def wait_for(predicate, process: subprocess.Popen, timeout: float = 900.0) -> None:
    """Polls until `predicate()` holds; fails if the process ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            pytest.fail(f"the run ended (code {process.returncode}) before the kill point")
        if time.monotonic() > deadline:
            pytest.fail("the kill point was not reached in time")
        time.sleep(0.005)


def kill_when(workdir: Path, predicate) -> None:
    """Starts the run and SIGKILLs it as soon as `predicate(checkpoint_dir)` holds."""
    process = subprocess.Popen(
        command(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=os.environ.copy(),
    )
    checkpoints = workdir / checkpointing.CHECKPOINT_DIR
    wait_for(lambda: checkpoints.exists() and predicate(checkpoints), process)
    process.send_signal(signal.SIGKILL)
    process.wait()


def saving(step: int):
    """True once step `step`'s checkpoint is being written (a temporary directory exists)."""
    return lambda checkpoints: any(
        p.name.startswith(f"{step}.") and "tmp" in p.name for p in checkpoints.iterdir()
    ) or (checkpoints / str(step)).exists()


def saved(step: int):
    """True once step `step`'s checkpoint is complete."""
    return lambda checkpoints: (checkpoints / str(step) / "commit_success.txt").exists() or (
        checkpoints / str(step) / "_CHECKPOINT_METADATA"
    ).exists()


def test_sigkilled_run_resumes_bitwise_equal(reference, tmp_path):
    _, expected = reference
    kill_when(tmp_path, saving(10))  # while a checkpoint is being written
    kill_when(tmp_path, saved(20))  # just after a checkpoint is complete
    result = subprocess.run(
        command(tmp_path), capture_output=True, text=True, env=os.environ.copy()
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert_bitwise_equal(final_state(tmp_path), expected)


def test_a_preempted_run_saves_the_step_it_stopped_at_and_resumes_from_it(
    reference, tmp_path, monkeypatch
):
    _, expected = reference
    config, _ = command_line.parse("pretrain", ["--config", SMOKE, "--workdir", str(tmp_path)])
    # jax.distributed's preemption service names step 13 as the sync point on every host.
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step == 13)
    summary = pretrain.train_and_evaluate(config, tmp_path)
    assert summary["preempted_at"] == 13
    schedule = checkpointing.checkpoint_steps(TOTAL_STEPS, config.checkpoint_every,
                                              config.log_spaced_checkpoints)
    checkpoints = tmp_path / checkpointing.CHECKPOINT_DIR
    saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert saved == [step for step in schedule if step < 13] + [13]
    assert not (tmp_path / pretrain.RESULTS_FILE).exists()  # the run is not finished
    monkeypatch.undo()
    resumed = pretrain.train_and_evaluate(config, tmp_path)
    assert (resumed["resumed_from"], resumed["preempted_at"]) == (13, None)
    logged = [json.loads(line)["step"] for line in (tmp_path / pretrain.LOG_FILE).open()]
    assert logged == sorted({*schedule, 13} - {0})  # each saved step once, in order
    assert_bitwise_equal(final_state(tmp_path), expected)


PREEMPTED_HOST_SCRIPT = """
import json, socket, sys
import jax
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{probe.getsockname()[1]}"
jax.distributed.initialize(address, num_processes=1, process_id=0)  # its preemption service too
from es_jax.commands import command_line
from es_jax.train import pretrain
config, workdir = command_line.parse("pretrain", sys.argv[1:])
summary = pretrain.train_and_evaluate(config, workdir)
print(json.dumps({"preempted_at": summary["preempted_at"]}))
"""


def test_sigterm_makes_a_distributed_run_save_the_step_it_reached_and_stop(tmp_path):
    argv = ["--config", SMOKE, "--workdir", str(tmp_path), "--config.total_steps=20000",
            "--config.checkpoint_every=10000"]  # scheduled: 0, 1, 100, 10000, 20000
    process = subprocess.Popen([sys.executable, "-c", PREEMPTED_HOST_SCRIPT, *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=os.environ.copy())
    checkpoints = tmp_path / checkpointing.CHECKPOINT_DIR
    wait_for(lambda: saved(100)(checkpoints), process)
    process.send_signal(signal.SIGTERM)  # what a cloud scheduler sends before it preempts
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    stopped = json.loads(stdout.strip().splitlines()[-1])["preempted_at"]
    assert 100 < stopped < 10000
    assert sorted(int(p.name) for p in checkpoints.iterdir()) == [0, 1, 100, stopped]
    assert int(checkpointing.read_state(checkpoints, stopped)["step"]) == stopped


def test_corrupt_checkpoint_is_skipped_with_a_warning(reference, tmp_path):
    source, expected = reference
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    corrupt = workdir / checkpointing.CHECKPOINT_DIR / str(TOTAL_STEPS) / "state"
    for data_file in (corrupt / "d").iterdir():
        data_file.write_bytes(data_file.read_bytes()[:7])
    config, _ = command_line.parse("pretrain", ["--config", SMOKE, "--workdir", str(workdir)])
    with pytest.warns(UserWarning, match=rf"checkpoints/{TOTAL_STEPS}\b.*could not be read"):
        summary = pretrain.train_and_evaluate(config, workdir)
    assert summary["resumed_from"] == 20
    # The command layer draws the loss curve from the resumed run's log.
    loss_plot = plot_training_loss(workdir / pretrain.LOG_FILE, workdir / "loss.png", "run")
    assert os.path.getsize(loss_plot) > 0
    assert (workdir / checkpointing.CORRUPT_DIR / str(TOTAL_STEPS)).exists()
    assert_bitwise_equal(final_state(workdir), expected)


def test_other_config_in_existing_workdir_is_refused(reference, tmp_path):
    source, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    changed = ["--config", SMOKE, "--workdir", str(workdir), "--config.learning_rate=0.5"]
    config, _ = command_line.parse("pretrain", changed)
    with pytest.raises(ValueError, match=r"learning_rate: 0\.001 -> 0\.5"):
        pretrain.train_and_evaluate(config, workdir)
    forced, _ = command_line.parse("pretrain", [*changed, "--config.force=True"])
    assert pretrain.train_and_evaluate(forced, workdir)["resumed_from"] == TOTAL_STEPS


def test_forced_config_of_another_model_keeps_the_checkpoints(reference, tmp_path):
    source, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    other_model = ["--config", SMOKE, "--workdir", str(workdir), "--config.model.hidden_size=16",
                   "--config.force=True"]
    config, _ = command_line.parse("pretrain", other_model)
    with pytest.raises(ValueError, match="another shape or structure"):
        pretrain.train_and_evaluate(config, workdir)
    assert not (workdir / checkpointing.CORRUPT_DIR).exists()
    assert (workdir / checkpointing.CHECKPOINT_DIR / str(TOTAL_STEPS)).exists()


def test_altered_checkpoint_is_moved_aside_and_the_run_resumes_before_it(
    reference, tmp_path, flip_bytes
):
    source, expected = reference
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    flip_bytes(workdir / checkpointing.CHECKPOINT_DIR / str(TOTAL_STEPS))
    config, _ = command_line.parse("pretrain", ["--config", SMOKE, "--workdir", str(workdir)])
    with pytest.warns(UserWarning, match=rf"checkpoints/{TOTAL_STEPS} could not be read "
                                         r"\(checksum mismatch"):
        summary = pretrain.train_and_evaluate(config, workdir)
    assert summary["resumed_from"] == 20
    assert (workdir / checkpointing.CORRUPT_DIR / str(TOTAL_STEPS)).exists()
    assert_bitwise_equal(final_state(workdir), expected)


@pytest.mark.parametrize(("refused", "error"), [
    ("--config.model.hidden_size=16", "another shape or structure"),
    ("--config.total_steps=0", "total_steps"),
])
def test_a_refused_forced_config_leaves_the_workdir_as_it_was(reference, tmp_path, refused, error):
    source, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    stored = (workdir / checkpointing.CONFIG_FILE).read_bytes()
    argv = ["--config", SMOKE, "--workdir", str(workdir)]
    forced, _ = command_line.parse("pretrain", [*argv, refused, "--config.force=True"])
    with pytest.raises(ValueError, match=error):
        pretrain.train_and_evaluate(forced, workdir)
    assert (workdir / checkpointing.CONFIG_FILE).read_bytes() == stored
    config, _ = command_line.parse("pretrain", argv)
    assert pretrain.train_and_evaluate(config, workdir)["resumed_from"] == TOTAL_STEPS


def test_a_refused_config_writes_nothing_in_a_new_workdir(tmp_path):
    workdir = tmp_path / "run"
    argv = ["--config", SMOKE, "--workdir", str(workdir), "--config.total_steps=0"]
    config, _ = command_line.parse("pretrain", argv)
    with pytest.raises(ValueError, match="total_steps"):
        pretrain.train_and_evaluate(config, workdir)
    assert not workdir.exists()


def test_a_diverged_run_stops_and_saves_no_non_finite_parameters(tmp_path):
    argv = ["--config", SMOKE, "--workdir", str(tmp_path), "--config.learning_rate=1e6"]
    config, _ = command_line.parse("pretrain", argv)
    with pytest.raises(ValueError, match=r"diverged at step \d: .*parameters became non-finite"
                                         r" .*newest checkpoint is step \d") as refused:
        pretrain.train_and_evaluate(config, tmp_path)
    diverged = int(re.search(r"at step (\d+)", str(refused.value)).group(1))
    schedule = checkpointing.checkpoint_steps(TOTAL_STEPS, config.checkpoint_every,
                                              config.log_spaced_checkpoints)
    checkpoints = tmp_path / checkpointing.CHECKPOINT_DIR
    saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert saved == [step for step in schedule if step < diverged]
    for step in saved:
        params = checkpointing.read_state(checkpoints, step)["params"]
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
