"""Reading finished runs: runs under a folder, their steps and config, params as host numpy."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

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
