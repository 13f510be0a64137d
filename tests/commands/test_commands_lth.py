"""`es-jax lth` on its tiny config: the results schema, chance values, plots, resuming after
SIGKILL to the values of an uninterrupted run, and refusals of bad configs and other-settings
workdirs."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flax import nnx

from es_jax import cli, models, pruning
from es_jax.commands import command_line, lth, lth_config, sweep

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "lth_text.py"
COMMAND = [sys.executable, "-m", "es_jax.cli", "lth", "--config", f"{CONFIG}:tiny", "--workdir"]
SIMILARITY = {"cosine", "iou", "chance_cosine", "chance_iou", "per_seed"}
SPREAD = {"mean", "std", "values"}


def tiny():
    return command_line.load_config(f"{CONFIG}:tiny")


def values_of(results):
    """What two runs of the same settings must agree on."""
    return {key: results[key] for key in ("values", "similarities", "runs", "task_similarity")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lth") / "run"
    return workdir, lth.run(tiny(), workdir, progress=False)


def test_tiny_run_stores_every_method_level_and_seed(finished):
    workdir, results = finished
    config = tiny()
    assert json.loads((workdir / "results.json").read_text()) == results
    assert [run["task"] for run in results["runs"]] == list(config.tasks)
    for run in results["runs"]:
        assert set(run["dense"]) == SPREAD
        assert len(run["dense"]["values"]) == len(config.seeds)
        assert [level["sparsity"] for level in run["levels"]] == list(config.sparsities)
        for level in run["levels"]:
            for method in ("omp", "lth", "lth_minus_omp"):
                assert set(level[method]) == SPREAD
                assert len(level[method]["values"]) == len(config.seeds)
            differences = [b - a for a, b in zip(level["omp"]["values"], level["lth"]["values"],
                                                 strict=True)]
            assert level["lth_minus_omp"]["values"] == differences
            similarity = level["similarity"]
            assert set(similarity) == SIMILARITY
            assert [r["seed"] for r in similarity["per_seed"]] == list(config.seeds)
            assert 0.0 <= similarity["cosine"] <= 1.0
            assert 0.0 <= similarity["iou"] <= 1.0
    pairs = [(p["sparsity"], p["tasks"]) for p in results["task_similarity"]]
    assert pairs == [(s, list(config.tasks)) for s in config.sparsities]
    assert all(0.0 <= p["cosine"] <= 1.0 for p in results["task_similarity"])
    stored = {(r["task"], r["seed"], r["method"], r["sparsity"]) for r in results["values"]}
    assert len(stored) == len(config.tasks) * len(config.seeds) * (1 + 2 * len(config.sparsities))


def test_dense_values_are_the_first_imp_round_and_seed_values_keep_seed_order(finished):
    _, results = finished
    stored = {(r["task"], r["seed"], r["method"], r["sparsity"]): r["value"]
              for r in results["values"]}
    for run in results["runs"]:
        assert run["dense"]["values"] == [stored[run["task"], seed, "dense", 0.0]
                                          for seed in run["seeds"]]
        level = run["levels"][-1]
        assert level["lth"]["values"] == [stored[run["task"], seed, "lth", level["sparsity"]]
                                          for seed in run["seeds"]]
        values = level["omp"]["values"]
        assert level["omp"]["std"] == pytest.approx(
            math.sqrt(sum((v - sum(values) / 2) ** 2 for v in values)))  # 2 seeds: n - 1 = 1


def test_chance_cosine_is_the_geometric_mean_of_the_densities(finished):
    _, results = finished
    config = tiny()
    model, _ = sweep.load_model(lth_config.model_entry(config), "classification", 0, 2)
    target = pruning.report(nnx.state(model, nnx.Param), where=models.prunable(model))
    size = target["target"]["size"]
    for run in results["runs"]:
        for level in run["levels"]:
            density = (size - round(level["sparsity"] * size)) / size
            assert level["similarity"]["chance_cosine"] == pytest.approx(
                math.sqrt(density * density), abs=1e-12)


def test_csv_summary_and_plots_are_written(finished):
    workdir, _ = finished
    rows = (workdir / "results.csv").read_text().splitlines()
    config = tiny()
    assert rows[0].split(",") == list(lth.CSV_FIELDS)
    assert len(rows) == 1 + len(config.tasks) * (1 + 2 * len(config.sparsities))
    assert "LTH - OMP" in (workdir / "summary.md").read_text()
    for name in ("lth_minus_omp.png", "similarity.png"):
        assert (workdir / name).stat().st_size > 0


def test_killed_run_resumes_to_the_values_of_an_uninterrupted_one(finished, tmp_path):
    _, expected = finished
    workdir = tmp_path / "killed"
    results = workdir / "results.json"
    total = len(expected["values"])
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen([*COMMAND, str(workdir)], stdout=subprocess.DEVNULL,
                                   stderr=stderr, env=os.environ.copy())
    deadline = time.monotonic() + 180
    while not results.exists():
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "no value was stored in time"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stored = len(json.loads(results.read_text())["values"])
    assert 0 < stored < total
    subprocess.run([*COMMAND, str(workdir)], check=True, capture_output=True)
    assert values_of(json.loads(results.read_text())) == values_of(expected)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tasks", ("pang_lee", "lee"), "'lee' is not a fine-tune classification task"),
        ("tasks", ("pang_lee", "pang_lee"), "distinct fine-tune tasks"),
        ("tasks", ("pang_le",), "unknown task 'pang_le'"),
        ("sparsities", (0.2, 0.1), "not strictly ascending levels in \\(0, 1\\)"),
        ("sparsities", (0.5, 1.0), "not strictly ascending levels in \\(0, 1\\)"),
        ("seeds", (0, 0), "not distinct non-negative integers"),
        ("seeds", (), "not distinct non-negative integers"),
        ("rewind_step", -1, "rewind_step=-1 is negative"),
        ("max_length", 0, "max_length=0 must be positive"),
        ("finetune.learning_rate", 0.0, "finetune.learning_rate=0.0 must be positive"),
        ("finetune.warmup", 3, "finetune: unknown fine-tuning settings \\['warmup'\\]"),
        ("model.tiny.model_type", "vit", "a vit model cannot be fine-tuned on 'pang_lee'"),
        ("mesh.fsdp", 3, "config.mesh: 3 does not divide the 8 devices"),
        ("mesh.data", 3, "config.mesh: data=3 x fsdp=1 is not the 8 devices"),
        ("finetune.batch_size", 12, "finetune.batch_size=12 does not split over the 8 devices"),
    ],
)
def test_bad_config_values_are_refused_in_one_line(key, value, message, tmp_path):
    config = tiny()
    *groups, last = key.split(".")
    node = config
    for group in groups:
        node = node[group]
    with config.unlocked():
        node[last] = value
    with pytest.raises(ValueError, match=message) as error:
        lth.run(config, tmp_path / "run", progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # refused before any work


def test_bad_override_on_the_command_line_exits_with_one_line(tmp_path, capsys):
    argv = ["lth", "--config", f"{CONFIG}:tiny", "--workdir", str(tmp_path / "run"),
            "--config.sparsities=0.3,0.2"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert str(exit_.value).startswith("es-jax lth: sparsities=(0.3, 0.2) are not strictly")
    assert "\n" not in str(exit_.value)


def test_workdir_of_other_settings_is_refused(finished, tmp_path):
    workdir, _ = finished
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text((workdir / "results.json").read_text())
    config = tiny()
    config.finetune.learning_rate = 1e-4
    message = ("holds values computed with other settings \\(finetune.learning_rate: 5e-05 -> "
               "0.0001\\); use another --workdir")
    with pytest.raises(ValueError, match=message):
        lth.run(config, other, progress=False)
    assert not (other / "imp").exists()


def test_full_config_is_valid():
    config = command_line.load_config(str(CONFIG))
    lth_config.validate(config)
    assert (tuple(config.tasks), config.model.name) == (lth_config.TEXT_TASKS, "minilm")
    assert tuple(config.sparsities) == (0.1, 0.2, 0.3, 0.4, 0.5)
