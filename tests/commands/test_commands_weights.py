"""`es-jax weights` end to end on its tiny config: two checkpoints of a real MLM smoke run (its
values against a numpy reference from the checkpoints), a supervised and a DINO vision
checkpoint, and bad sources or settings refused with one line before anything is written."""

import csv
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es_jax import cli
from es_jax.commands import command_line, pretrain_config, weights, weights_config
from es_jax.commands import pretrain as pretrain_command
from es_jax.train import checkpointing, vision

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIG = CONFIGS / "ssl_vs_sl_weights.py"
COMPONENTS = (("attention", "query"), ("attention", "key"), ("attention", "value"),
              ("attention", "out"), ("mlp", "up"), ("mlp", "down"))


def tiny(**models: str):
    """The :tiny config with its models' sources replaced."""
    config = command_line.load_config(f"{CONFIG}:tiny")
    for label, source in models.items():
        config.models[label] = source
    return config


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """The MLM smoke run that the :tiny config reads (checkpoints 0, 1, 3, 10, 20, 30)."""
    workdir = tmp_path_factory.mktemp("weights") / "smoke"
    pretrain_command.run(command_line.load_config(str(CONFIGS / "pretrain_smoke.py")), workdir)
    return workdir


@pytest.fixture(scope="module")
def finished(smoke_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("weights") / "out"
    config = tiny(early=f"{smoke_run}@10", final=str(smoke_run))
    return workdir, weights.run(config, workdir, progress=False)


def reference_fractions(params: dict, threshold: float) -> dict[str, float]:
    """numpy: per block, the fraction of its six target kernels' |w| below threshold x std."""
    fractions = {}
    for index, block in params["bert"]["encoder"]["layers"].items():
        kernels = [block[group][name]["kernel"] for group, name in COMPONENTS]
        below = sum(int(np.sum(np.abs(k) < threshold * np.std(k, dtype=np.float64)))
                    for k in kernels)
        fractions[index] = below / sum(k.size for k in kernels)
    return fractions


def test_tiny_variant_compares_two_steps_of_the_smoke_run():
    config = weights_config.get_config("tiny")
    assert config.models.to_dict() == {"early": "runs/smoke@10", "final": "runs/smoke"}
    assert config.reference == "early"


def test_tiny_run_matches_a_numpy_reference_from_the_checkpoints(finished, smoke_run):
    workdir, report = finished
    assert json.loads((workdir / "weights.json").read_text()) == report
    run = checkpointing.open_run(smoke_run)
    early, final = report["models"]["early"], report["models"]["final"]
    assert (early["loaded"], final["loaded"]) == (f"{smoke_run}@10", f"{smoke_run}@30")
    sizes = {}
    for i, threshold in enumerate(report["thresholds"]):
        expected = {label: reference_fractions(run.read_params(step), threshold)
                    for label, step in (("early", 10), ("final", 30))}
        for label, record in (("early", early), ("final", final)):
            for layer, fraction in expected[label].items():
                histogram = record["histograms"][layer]
                sizes[layer] = histogram["size"]
                assert record["near_zero"]["layers"][layer][i] == pytest.approx(
                    fraction, abs=0.5 / histogram["size"])
        for layer in expected["early"]:
            points = report["differences"]["final"]["layers"][layer][i]
            assert points == pytest.approx(
                100 * (expected["final"][layer] - expected["early"][layer]), abs=1e-9)
    block = 4 * 32 * 32 + 2 * 32 * 64  # q, k, v, out (32x32), up (32x64), down (64x32)
    assert sizes == {"0": block, "1": block}
    assert final["target_size"] == sum(sizes.values())


def test_tiny_run_writes_csv_and_plots(finished):
    workdir, report = finished
    with open(workdir / "weights.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * (1 + 2) * len(report["thresholds"])
    final_target = [r for r in rows if r["model"] == "final" and r["scope"] == "target"]
    assert [float(r["near_zero_percent"]) for r in final_target] == pytest.approx(
        [100 * v for v in report["models"]["final"]["near_zero"]["target"]])
    assert [float(r["minus_reference_points"]) for r in final_target] == pytest.approx(
        report["differences"]["final"]["target"])
    assert all(r["minus_reference_points"] == "" for r in rows if r["model"] == "early")
    for name in ("distributions.png", "near_zero.png"):
        assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def save_vision_run(run_dir: Path, objective: str, seed: int) -> None:
    """A vision run of the objective's tiny config, its freshly built model saved at step 5."""
    config = pretrain_config.vision_config(objective, "tiny")
    config.seed = seed
    params = nnx.to_pure_dict(nnx.state(vision.build_model(config), nnx.Param))
    manager = checkpointing.open_manager(checkpointing.checkpoint_dir(run_dir), async_save=False)
    checkpointing.save(manager, 5, {"params": params, "step": jnp.int32(5)}, None)
    manager.wait_until_finished()
    manager.close()
    checkpointing.store_config(run_dir, config)


def test_supervised_and_dino_checkpoints_compare_layer_by_layer(tmp_path):
    save_vision_run(tmp_path / "supervised", "supervised", seed=0)
    save_vision_run(tmp_path / "dino", "dino", seed=1)
    config = tiny()
    config.models = {"supervised": str(tmp_path / "supervised"), "dino": str(tmp_path / "dino")}
    config.reference = "supervised"
    report = weights.run(config, tmp_path / "out", progress=False)
    for record in report["models"].values():
        assert record["family"] == "vit"
        assert list(record["histograms"]) == ["0", "1"]
    difference = report["differences"]["dino"]["target"]
    assert difference == pytest.approx([
        100 * (d - s) for d, s in zip(report["models"]["dino"]["near_zero"]["target"],
                                      report["models"]["supervised"]["near_zero"]["target"],
                                      strict=True)])


def refusal(tmp_path: Path, *overrides: str) -> str:
    """The one line `es-jax weights --config CONFIG:tiny OVERRIDES` exits with; nothing is
    written."""
    workdir = tmp_path / "refused"
    argv = ["weights", "--config", f"{CONFIG}:tiny", "--workdir", str(workdir), *overrides]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("es-jax weights: ")
    assert "\n" not in message
    assert not (workdir / "weights.json").exists()
    return message


def test_bad_sources_and_settings_are_refused_with_one_line(smoke_run, tmp_path):
    final = f"--config.models.final={smoke_run}"
    assert "models.early: run directory" in refusal(
        tmp_path, f"--config.models.early={tmp_path / 'nowhere'}@10", final)
    unsaved = refusal(tmp_path, f"--config.models.early={smoke_run}@7", final)
    assert "models.early: run " in unsaved
    assert "no checkpoint at step 7; saved steps: [0, 1, 3, 10, 20, 30]" in unsaved
    missing = refusal(tmp_path, f"--config.models.early={tmp_path / 'no_model'}", final)
    assert "models.early: Model folder" in missing
    assert "does not exist" in missing
    assert "reference='final2' is none of the models' labels" in refusal(
        tmp_path, "--config.reference=final2")
    assert "thresholds=(0.1, 0.01) are not strictly ascending" in refusal(
        tmp_path, "--config.thresholds=0.1,0.01")
