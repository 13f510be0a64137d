"""The sweep's results store loses nothing and stores nothing wrong: runs of other configs are kept,
stale runs are replaced only when asked, one sweep at a time writes a workdir (a SIGKILLed holder
never blocks it), non-finite metrics are errors, and results.json is strict JSON."""

import json
import signal
import subprocess
import sys

import ml_collections
import pytest

from es_jax import models
from es_jax.commands import sweep, sweep_config
from es_jax.commands.sweep_results import exclusive

TINY_BERT = {**models.TINY_HF_CONFIGS["bert"], "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def bert_config(data_dir: str, task: str = "wordsim353") -> ml_collections.ConfigDict:
    """One curve of a tiny BERT: one task, global magnitude, levels 0, 0.5."""
    config = sweep_config.default_config()
    config.grid = (0.0, 0.5)
    config.data_dir = data_dir
    config.models = ml_collections.ConfigDict()
    config.models.bert = sweep_config.model_settings(
        tiny=TINY_BERT, tasks=(task,), max_length=32, max_examples=20, batch_size=8
    )
    return config


def strict_json(path):
    """The file parsed as strict JSON (NaN and Infinity refused)."""
    refuse = lambda name: pytest.fail(f"{name} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_runs_of_another_config_are_kept_and_not_recomputed(tmp_path, data_dir, monkeypatch):
    first = sweep.run(bert_config(data_dir, "wordsim353"), tmp_path, progress=False)
    sweep.run(bert_config(data_dir, "lee"), tmp_path, progress=False)
    stored = {run["id"]: run for run in strict_json(tmp_path / "results.json")["runs"]}
    assert set(stored) == {"bert|wordsim353|global|magnitude", "bert|lee|global|magnitude"}
    assert stored["bert|wordsim353|global|magnitude"] == first["runs"][0]
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + 2 * 2

    def fail(*args, **kwargs):
        raise AssertionError("a stored run must not be computed again")

    monkeypatch.setattr(sweep, "prepare", fail)
    again = sweep.run(bert_config(data_dir, "wordsim353"), tmp_path, progress=False)
    assert {run["id"] for run in again["runs"]} == set(stored)


def test_runs_computed_with_other_settings_are_replaced_only_when_asked(tmp_path, data_dir):
    sweep.run(bert_config(data_dir), tmp_path, progress=False)
    before = (tmp_path / "results.json").read_bytes()
    changed = bert_config(data_dir)
    changed.models.bert.max_length = 16
    with pytest.raises(ValueError, match=r"computed with other settings.*overwrite=True"):
        sweep.run(changed, tmp_path, progress=False)
    assert (tmp_path / "results.json").read_bytes() == before
    changed.overwrite = True
    (run,) = sweep.run(changed, tmp_path, progress=False)["runs"]
    assert run["fingerprint"] != json.loads(before)["runs"][0]["fingerprint"]


def test_a_second_sweep_in_the_same_workdir_is_refused(tmp_path, data_dir):
    busy = r"in use by es-jax sweep, pid"
    with exclusive(tmp_path), pytest.raises(ValueError, match=busy):
        sweep.run(bert_config(data_dir), tmp_path, progress=False)
    assert not (tmp_path / "results.json").exists()


def test_a_sigkilled_holder_leaves_no_lock_behind(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, pathlib\n"
            "from es_jax.commands.sweep_results import exclusive\n"
            "with exclusive(pathlib.Path(sys.argv[1])):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(600)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ValueError, match=f"pid {holder.pid}"), exclusive(tmp_path):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with exclusive(tmp_path):
        pass


def test_too_few_examples_for_a_finite_metric_are_refused(tmp_path, data_dir):
    config = bert_config(data_dir)
    config.models.bert.max_examples = 1
    with pytest.raises(ValueError, match=r"max_examples=1: wordsim353 .* at least 3"):
        sweep.run(config, tmp_path, progress=False)


def test_a_non_finite_metric_is_an_error_and_never_stored(tmp_path, data_dir, monkeypatch):
    original = sweep.Evaluator.__call__
    calls = []

    def nan_at_the_second_level(self, params, *level):
        calls.append(1)
        return float("nan") if len(calls) == 2 else original(self, params, *level)

    monkeypatch.setattr(sweep.Evaluator, "__call__", nan_at_the_second_level)
    with pytest.raises(ValueError, match=r"bert/wordsim353 at 0.5 sparsity: the metric is nan"):
        sweep.run(bert_config(data_dir), tmp_path, progress=False)
    (run,) = strict_json(tmp_path / "results.json")["runs"]
    assert [level["sparsity"] for level in run["levels"]] == [0.0]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("[1, 2]"), "is not a sweep's results"),
        (lambda p: p.write_text('{"runs": [{"id": "x", "dense": NaN}]}'), "non-finite number"),
        (lambda p: p.write_text('{"runs": '), "cannot be read as a sweep's results"),
        (lambda p: p.mkdir(), "cannot be read as a sweep's results"),
    ],
)
def test_a_results_json_that_is_not_a_sweeps_is_named(tmp_path, data_dir, make, message):
    make(tmp_path / "results.json")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'results.json'}.*{message}"):
        sweep.run(bert_config(data_dir), tmp_path, progress=False)
