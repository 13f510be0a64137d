"""Every experiment config: its docstring opens with its command, its full form names known tasks
and patterns, and its tiny variant runs end to end (tiny random models, tfds mock data)."""

from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from es_jax.evaluate import sweep, sweep_config
from es_jax.evaluate import tasks as task_registry

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXPERIMENTS = (
    "bert_base_glue.py",
    "opt_glue.py",
    "vit_dino_cifar.py",
    "vicuna_perplexity.py",
    "default.py",
)


def load(name: str, variant: str = ""):
    return sweep_config.load_config_file(f"{CONFIGS / name}{':' + variant if variant else ''}")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_docstring_opens_with_the_command(name):
    first_line = (CONFIGS / name).read_text().split('"""')[1].splitlines()[0]
    assert first_line.startswith(f"es-jax sweep --config configs/{name} --workdir runs/")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_full_config_names_known_tasks_patterns_and_scorers(name):
    config = load(name)
    assert set(config.keys()) <= sweep_config.TOP_LEVEL_KEYS
    sweep_config.check_grid(config.grid)
    for settings in config.models.values():
        for task in settings.tasks:
            task_registry.get(task)
        for pattern in settings.patterns:
            sweep_config.parse_pattern(pattern)
        assert set(settings.scorers) <= set(sweep_config.SCORERS)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown config variant"):
        load("opt_glue.py", "huge")


@pytest.mark.parametrize(
    "name",
    [
        "bert_base_glue.py",
        "opt_glue.py",
        "vit_dino_cifar.py",
        "vicuna_perplexity.py",
    ],
)
def test_tiny_variant_runs_end_to_end(name, tmp_path):
    config = load(name, "tiny")
    config.data_dir = str(tmp_path / "data")
    with tfds.testing.mock_data(num_examples=16):
        results = sweep.run(config, tmp_path / "run", progress=False)
    assert {run["model"] for run in results["runs"]} == set(config.models.keys())
    for run in results["runs"]:
        assert run["dense"] is not None
        sparsities = [level["sparsity"] for level in run["levels"]]
        assert sparsities == [0.0, 0.5] or run["pattern"] != "global"
        assert run["essential_sparsity"] in sparsities
    assert set(results["compilations"].values()) == {1}
    assert (tmp_path / "run" / "drops.png").is_file()
