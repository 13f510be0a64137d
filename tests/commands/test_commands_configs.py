"""Every config in configs/: its docstring opens with its command, its full form names known
tasks and patterns, and its tiny variant runs end to end (tiny random models, tfds mock data;
the `es-jax lth` config's in tests/commands/test_commands_lth.py)."""

from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from es_jax.cli import COMMANDS
from es_jax.commands import command_line, pretrain_config, sweep, sweep_config
from es_jax.evaluate import tasks as task_registry

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXPERIMENTS = (
    "bert_base_glue.py",
    "opt_glue.py",
    "vit_dino_cifar.py",
    "vicuna_perplexity.py",
    "llm_methods.py",
    "ssl_vs_sl_sweep.py",
    "mlm_checkpoints_sweep.py",
    "vision_checkpoints_sweep.py",
    "default.py",
)
PRETRAINING = ("pretrain_cpu.py", "pretrain_smoke.py", "bert_base_pretrain.py")
LOTTERY = ("lth_text.py",)  # es-jax lth; its tiny run is tests/commands/test_commands_lth.py
# es-jax pretrain of a ViT; their tiny runs are tests/train/test_train_vision.py.
VISION_PRETRAINING = ("fashion_vit_supervised.py", "fashion_vit_dino.py")
WEIGHTS = ("ssl_vs_sl_weights.py",)  # es-jax weights; tests/commands/test_commands_weights.py


def load(name: str, variant: str = ""):
    return command_line.load_config(f"{CONFIGS / name}{':' + variant if variant else ''}")


def test_every_config_file_is_listed_here():
    listed = {*EXPERIMENTS, *PRETRAINING, *LOTTERY, *VISION_PRETRAINING, *WEIGHTS}
    assert {p.name for p in CONFIGS.glob("*.py")} == listed


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.py")))
def test_docstring_opens_with_the_command(name):
    first_line = (CONFIGS / name).read_text().split('"""')[1].splitlines()[0]
    command = first_line.split(" --config ")[0]
    assert command.removeprefix("es-jax ") in COMMANDS
    assert first_line.startswith(f"{command} --config configs/{name} --workdir ")


@pytest.mark.parametrize("name", PRETRAINING)
def test_pretraining_tiny_variant_is_the_offline_smoke_run(name):
    tiny, smoke = load(name, "tiny"), pretrain_config.get_config("tiny")
    assert tiny.model.to_dict() == smoke.model.to_dict()
    assert tiny.data.to_dict() == smoke.data.to_dict()
    assert (tiny.total_steps, tiny.distributed) == (30, False)


def test_vision_pretraining_configs_share_backbone_optimizer_and_images_seen():
    supervised, dino = (load(name) for name in VISION_PRETRAINING)
    assert (supervised.objective, dino.objective) == ("supervised", "dino")
    assert supervised.model.to_dict() == dino.model.to_dict()
    for key in ("global_batch_size", "total_steps", "learning_rate", "warmup_steps",
                "weight_decay", "adam_b1", "adam_b2", "grad_clip_norm"):
        assert supervised[key] == dino[key], key
    assert "dino" not in supervised
    assert load(VISION_PRETRAINING[1], "tiny").total_steps == 20


def test_pretraining_configs_change_only_what_differs_from_the_base():
    base = pretrain_config.get_config()
    assert load("pretrain_cpu.py").to_dict() == base.to_dict()
    assert load("pretrain_smoke.py").to_dict() == pretrain_config.get_config("tiny").to_dict()
    assert set(load("bert_base_pretrain.py").keys()) == set(base.keys())


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


@pytest.mark.parametrize("name", ["opt_glue.py", "pretrain_cpu.py"])
def test_unknown_variant_is_refused(name, tmp_path):
    argv = ["--config", f"{CONFIGS / name}:huge", "--workdir", str(tmp_path)]
    with pytest.raises(ValueError, match="unknown config variant 'huge'"):
        command_line.parse("sweep", argv)


@pytest.mark.parametrize(
    "name",
    [
        "bert_base_glue.py",
        "opt_glue.py",
        "vit_dino_cifar.py",
        "vicuna_perplexity.py",
        "llm_methods.py",
        "mlm_checkpoints_sweep.py",
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


@pytest.mark.parametrize(
    ("name", "tasks", "seeds"),
    [
        ("ssl_vs_sl_sweep.py",
         {("dino_finetune", "fashion_mnist_few"), ("dino_knn", "fashion_knn")}, [0, 1]),
        ("vision_checkpoints_sweep.py", {("dino_step_100", "fashion_knn")}, None),
    ],
)
def test_vision_sweep_tiny_variants_run_on_the_real_images(name, tasks, seeds, tmp_path):
    # Fashion-MNIST and digits are local sets (no download), read whole: no tfds mock data.
    config = load(name, "tiny")
    config.data_dir = str(tmp_path / "data")
    results = sweep.run(config, tmp_path / "run", progress=False)
    assert {(run["model"], run["task"]) for run in results["runs"]} == tasks
    for run in results["runs"]:
        expected = seeds if run["protocol"] == "finetune" else None  # zero-shot: evaluated once
        assert [level.get("seeds") for level in run["levels"]] == [expected, expected]
    assert (tmp_path / "run" / "drops.png").is_file()
