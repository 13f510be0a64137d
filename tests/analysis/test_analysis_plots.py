"""Figures drawn from a training run's log: the loss curve."""

import json
import os

import pytest

from es_jax.analysis import plots


def write_log(path, records) -> None:
    """A JSON-lines training log of `records`, as pre-training appends them."""
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_a_step_logged_again_after_resuming_counts_once(tmp_path):
    log = tmp_path / "train_log.jsonl"
    write_log(log, [{"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.0},
                    {"step": 30, "loss": 3.5}, {"step": 30, "loss": 3.0}])
    records = plots.training_records(log)
    assert [(r["step"], r["loss"]) for r in records] == [(10, 5.0), (20, 4.0), (30, 3.0)]


def test_loss_curve_is_written_from_the_log(tmp_path):
    log = tmp_path / "train_log.jsonl"
    write_log(log, [{"step": step, "loss": 6.0 - step / 10} for step in (1, 5, 10, 20)])
    path = plots.plot_training_loss(log, tmp_path / "plots" / "loss.png", "smoke")
    assert path == tmp_path / "plots" / "loss.png"
    assert path.read_bytes().startswith(b"\x89PNG")


def test_no_loss_curve_without_logged_steps(tmp_path):
    assert plots.plot_training_loss(tmp_path / "absent.jsonl", tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


def test_a_line_cut_short_by_a_kill_is_skipped_with_a_warning(tmp_path):
    log = tmp_path / "train_log.jsonl"
    write_log(log, [{"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.0}])
    log.write_text(log.read_text() + '{"step": 30, "lo')
    with pytest.warns(UserWarning, match=r"train_log\.jsonl, line 3: not a complete JSON record"):
        records = plots.training_records(log)
    assert [(r["step"], r["loss"]) for r in records] == [(10, 5.0), (20, 4.0)]
    with pytest.warns(UserWarning, match="line 3"):
        assert os.path.getsize(plots.plot_training_loss(log, tmp_path / "loss.png")) > 0
