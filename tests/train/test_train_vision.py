"""Vision pre-training through `es-jax pretrain`: supervised and DINO-style smoke runs on real
Fashion-MNIST images, the DINO step's teacher and centre updates, and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es_jax.commands import command_line
from es_jax.commands import pretrain as pretrain_command
from es_jax.train import checkpointing, dino, objectives, pretrain, vision

CONFIGS = Path(__file__).parents[2] / "configs"
SUPERVISED = f"{CONFIGS / 'fashion_vit_supervised.py'}:tiny"
DINO = f"{CONFIGS / 'fashion_vit_dino.py'}:tiny"


def tiny_run(config_arg: str, workdir: Path) -> dict:
    """Runs `es-jax pretrain` in this process; returns its summary."""
    config, _ = command_line.parse("pretrain", ["--config", config_arg, "--workdir", str(workdir)])
    return pretrain_command.run(config, workdir)


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted DINO smoke run and its summary."""
    workdir = tmp_path_factory.mktemp("dino") / "run"
    return workdir, tiny_run(DINO, workdir)


def test_supervised_smoke_run_checkpoints_and_reports_knn_accuracy(tmp_path):
    summary = tiny_run(SUPERVISED, tmp_path)
    assert summary["step"] == 20
    assert (tmp_path / "loss.png").exists()
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[0] == 0
    assert steps[-1] == 20
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["knn_test"] == 200
    assert stored["knn_bank"] == 500
    # Ten classes: even a barely trained backbone's features are far better than chance (10%).
    assert 30.0 < stored["knn_accuracy"] <= 100.0
    params = checkpointing.open_run(tmp_path).read_params(20)
    assert set(params) == {"vit", "classifier"}


def test_dino_smoke_run_keeps_teacher_student_and_centre(dino_run):
    workdir, summary = dino_run
    assert summary["step"] == 20
    assert np.isfinite(summary["loss"])
    assert 0.996 < summary["teacher_momentum"] <= 1.0
    assert 30.0 < summary["knn_accuracy"] <= 100.0
    state = checkpointing.read_state(workdir / checkpointing.CHECKPOINT_DIR, 20)
    assert set(state) == {"params", "student", "center", "opt_state", "step", "rng"}
    assert set(state["params"]) == {"vit", "head"}
    teacher, student = jax.tree.leaves(state["params"]), jax.tree.leaves(state["student"])
    assert any(not np.array_equal(t, s) for t, s in zip(teacher, student, strict=True))
    assert np.abs(state["center"]).sum() > 0


def test_dino_step_updates_teacher_by_ema_and_centre_by_teacher_outputs():
    config, _ = command_line.parse("pretrain", ["--config", DINO, "--workdir", "unused"])
    optimizer = pretrain.make_optimizer(config)
    build = partial(vision.build_model, config)
    graphdef, rest = objectives.split_model(build)
    student = nnx.state(build(), nnx.Param).to_pure_dict()
    state = {**objectives.init_train_state(student, optimizer, config.seed),
             "params": jax.tree.map(lambda x: x * 0.5, student),  # a teacher unlike the student
             "student": student, "center": jnp.full((config.dino.out_dim,), 0.01)}
    rng = np.random.default_rng(0)
    batch = {"global": rng.uniform(-1, 1, (4, 2, 28, 28, 1)).astype(np.float32),
             "local": rng.uniform(-1, 1, (4, 2, 12, 12, 1)).astype(np.float32)}
    schedule = vision.dino_schedule(config)
    new, metrics = jax.jit(partial(vision.dino_step, graphdef=graphdef, optimizer=optimizer,
                                   schedule=schedule))(state, batch, rest)
    momentum = float(dino.teacher_momentum(0, schedule.total_steps, schedule.momentum_teacher))
    assert float(metrics["teacher_momentum"]) == pytest.approx(momentum)
    for t_old, s_new, t_new in zip(jax.tree.leaves(state["params"]),
                                   jax.tree.leaves(new["student"]),
                                   jax.tree.leaves(new["params"]), strict=True):
        np.testing.assert_allclose(t_new, momentum * t_old + (1 - momentum) * s_new, atol=1e-6)
    teacher = nnx.merge(graphdef, state["params"], rest)
    teacher.eval()
    views = np.concatenate([batch["global"][:, 0], batch["global"][:, 1]])  # view-major
    outputs = np.asarray(teacher(views))
    expected = 0.01 * schedule.center_momentum + (1 - schedule.center_momentum) * outputs.mean(0)
    np.testing.assert_allclose(new["center"], expected, atol=1e-5)
    assert int(new["step"]) == 1
    assert np.isfinite(float(metrics["loss"]))


def test_killed_dino_run_resumes_bitwise_equal(dino_run, tmp_path):
    reference, _ = dino_run
    command = [sys.executable, "-m", "es_jax.cli", "pretrain", "--config", DINO, "--workdir",
               str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = tmp_path / "checkpoints" / "10" / "_CHECKPOINT_METADATA"
    deadline = time.monotonic() + 600
    while not done.exists():
        assert process.poll() is None, "the run ended before its step-10 checkpoint"
        assert time.monotonic() < deadline, "no step-10 checkpoint in time"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "results.json").read_text())["resumed_from"] >= 10
    expected = checkpointing.read_state(reference / "checkpoints", 20)
    resumed = checkpointing.read_state(tmp_path / "checkpoints", 20)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(expected),
                                 jax.tree_util.tree_leaves_with_path(resumed), strict=True):
        assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)
