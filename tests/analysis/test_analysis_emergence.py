"""Emergence analysis over checkpoints: exact figures on constructed runs, transitions, reports."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from es_jax.analysis import emergence
from es_jax.train import checkpointing

LAYERS, HIDDEN, FFN = 2, 8, 16
COMPONENTS = ("attention/query", "attention/key", "attention/value", "attention/out")
STEPS = (0, 10, 20, 30)


def bert_like_params(seed: int, tiny: dict[str, int], hidden: int = HIDDEN,
                     ffn: int = FFN) -> dict:
    """A BERT-shaped parameter tree with `tiny[path]` weights of each target set to 1e-5."""
    rng = np.random.default_rng(seed)
    layers = {}
    for layer in range(LAYERS):
        shapes = {f"attention/{n}": (hidden, hidden) for n in ("query", "key", "value", "out")}
        shapes |= {"mlp/up": (hidden, ffn), "mlp/down": (ffn, hidden)}
        block: dict = {"attention": {}, "mlp": {}}
        for name, shape in shapes.items():
            kernel = rng.uniform(0.1, 1.0, size=shape).astype(np.float32)
            path = f"bert/encoder/layers/{layer}/{name}/kernel"
            kernel.reshape(-1)[: tiny.get(path, 0)] = 1e-5
            group, leaf = name.split("/")
            block[group][leaf] = {"kernel": kernel, "bias": np.zeros(shape[1], np.float32)}
        layers[str(layer)] = block
    embeddings = {"word_embeddings": {"embedding": rng.normal(size=(32, hidden))}}
    return {"bert": {"embeddings": jax.tree.map(np.float32, embeddings),
                     "encoder": {"layers": layers}}}


def tiny_counts(step: int) -> dict[str, int]:
    """How many near-zero weights each query kernel holds at `step` (a jump after step 10)."""
    count = 2 if step <= 10 else 40
    return {f"bert/encoder/layers/{i}/attention/query/kernel": count for i in range(LAYERS)}


def write_run(run_dir, fraction: float) -> None:
    """Checkpoints of a fake run in the pre-training layout, and its config.json."""
    manager = checkpointing.open_manager(run_dir / checkpointing.CHECKPOINT_DIR, async_save=False)
    for step in STEPS:
        params = jax.tree.map(jnp.asarray, bert_like_params(step, tiny_counts(step)))
        state = {"params": params, "step": jnp.asarray(step, jnp.int32)}
        checkpointing.save(manager, step, state, {"position": step})
    manager.close()
    (run_dir / "config.json").write_text(json.dumps({"data": {"fraction": fraction}}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder with two fake runs, analysed once."""
    root = tmp_path_factory.mktemp("runs")
    for name, fraction in (("data_100", 1.0), ("data_60", 0.6)):
        (root / name).mkdir()
        write_run(root / name, fraction)
    runs = [checkpointing.open_run(run) for run in checkpointing.find_runs(root)]
    report = emergence.emergence(root, runs, thresholds=(1e-4, 1e-2), relative_thresholds=(0.01,),
                                 sparsities=(0.1, 0.5), headline="near_zero@0.0001")
    return root, report


def test_near_zero_fractions_are_exact(runs):
    _, report = runs
    target_size = LAYERS * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)
    for record in report["runs"][0]["steps"]:
        tiny = sum(tiny_counts(record["step"]).values())
        assert record["near_zero"]["target"][0] == tiny / target_size
        assert record["components"]["attention/query"]["near_zero"][0] == tiny / (
            LAYERS * HIDDEN * HIDDEN
        )
        assert record["components"]["attention/key"]["near_zero"][0] == 0.0
        assert record["layers"]["0"]["near_zero"][0] == tiny / 2 / (target_size / LAYERS)
        assert record["exact_zeros"]["target"] == 0.0
        assert record["exact_zeros"]["model"] > 0.0  # the zero biases count over the model


def test_components_and_layers_are_the_families_reading_of_paths():
    from es_jax.models import bert

    path = "bert/encoder/layers/11/mlp/down/kernel"
    assert bert.component_of(path) == "mlp/down"
    assert emergence.layer_name(bert, path) == "11"
    assert emergence.layer_name(bert, "bert/embeddings/word_embeddings/embedding") == "other"


def test_steps_are_listed_with_mask_overlaps(runs):
    _, report = runs
    records = report["runs"][1]["steps"]
    assert [r["step"] for r in records] == list(STEPS)
    assert all(m["previous"] is None for m in records[0]["masks"])
    final = records[-1]["masks"][1]["final"]
    assert final["iou"] == pytest.approx(1.0)
    assert final["cosine"] == pytest.approx(1.0)
    assert final["chance_iou"] == pytest.approx(0.5 * 0.5 / (1 - 0.25))
    assert records[1]["masks"][0]["previous"]["iou"] < 1.0  # independent random weights


def test_transition_is_found_where_the_curve_jumps(runs):
    _, report = runs
    for row in report["comparison"]:
        assert row["largest_jump"]["from_step"] == 10
        assert row["largest_jump"]["to_step"] == 20
        assert row["change_point"]["step"] in (10, 20)


def test_change_point_of_a_bent_line():
    steps = np.arange(0, 50)
    values = np.where(steps < 30, 0.001 * steps, 0.03 + 0.02 * (steps - 30))
    found = emergence.change_point(steps, values)
    assert found["step"] == 30
    assert found["slope_before"] == pytest.approx(0.001, abs=1e-9)
    assert found["slope_after"] == pytest.approx(0.02, abs=1e-9)


def test_reports_and_plots_are_written(runs):
    root, _ = runs
    stored = json.loads((root / emergence.RESULTS_FILE).read_text())
    # Natural order of the run names: data_60 before data_100.
    assert [r["label"] for r in stored["runs"]] == ["data_60 (data 60%)", "data_100 (data 100%)"]
    assert len(stored["comparison"]) == 2
    for run in ("data_100", "data_60"):
        assert json.loads((root / run / emergence.RESULTS_FILE).read_text())["steps"]
    for name in ("near_zero", "mask_overlap", "components"):
        assert (root / f"emergence_{name}.png").stat().st_size > 0


class MemoryRun(NamedTuple):
    """A run held in memory: the analysis reads any object with these four fields."""

    directory: Path
    steps: list[int]
    config: dict[str, Any]
    read_params: Callable[[int], Any]


def test_the_analysis_reads_through_any_reader(runs, tmp_path):
    _, report = runs
    run = MemoryRun(tmp_path, list(STEPS), {"data": {"fraction": 0.6}},
                    lambda step: bert_like_params(step, tiny_counts(step)))
    result = emergence.analyse_run(run, thresholds=(1e-4, 1e-2), relative_thresholds=(0.01,),
                                   sparsities=(0.1, 0.5))
    assert result["label"] == f"{tmp_path.name} (data 60%)"
    assert result["steps"] == report["runs"][0]["steps"]
    assert json.loads((tmp_path / emergence.RESULTS_FILE).read_text()) == result


def test_analysis_on_a_4x2_mesh_equals_one_device(tmp_path, monkeypatch):
    from jax.sharding import NamedSharding

    from es_jax import mesh as meshes

    mesh = meshes.make_mesh(4, 2)
    kept, real_held = [], emergence.held

    def held(masks, on):
        kept.append(real_held(masks, on))
        return kept[-1]

    monkeypatch.setattr(emergence, "held", held)

    def analysed(name, on):
        """One run of wide kernels (64 x 128: split along fsdp), analysed on `on`."""
        run = MemoryRun(tmp_path / name, list(STEPS), {},
                        lambda step: bert_like_params(step, tiny_counts(step), 64, 128))
        run.directory.mkdir()
        return emergence.analyse_run(run, thresholds=(1e-4, 1e-2), relative_thresholds=(0.01, 0.5),
                                     sparsities=(0.1, 0.5), mesh=on)

    single, sharded = analysed("single", None), analysed("sharded", mesh)
    assert sharded["steps"] == single["steps"]
    assert sharded["transitions"] == single["transitions"]
    assert single["steps"][-1]["near_zero"]["target"][0] == 80 / (2 * (4 * 64 * 64 + 2 * 64 * 128))
    masks = jax.tree.leaves(kept[len(kept) // 2:])  # the sharded run's: final, then each step's
    assert len(masks) == (1 + len(STEPS)) * 2 * LAYERS * 6  # 2 sparsities x 6 kernels a layer
    for mask in masks:
        spec = meshes.leaf_spec(mask.shape, 2)
        assert meshes.FSDP_AXIS in spec  # every target kernel is split along fsdp
        assert mask.sharding.is_equivalent_to(NamedSharding(mesh, spec), mask.ndim)


def cut_short(checkpoint: Path) -> None:
    """Truncates the array files of a step's state, as a full disk or a lost copy leaves them."""
    for data_file in (checkpoint / "state" / "d").iterdir():
        data_file.write_bytes(data_file.read_bytes()[:7])


def test_unreadable_checkpoints_are_skipped_with_a_warning_naming_them(tmp_path):
    for name, fraction in (("data_100", 1.0), ("data_60", 0.6)):
        (tmp_path / name).mkdir()
        write_run(tmp_path / name, fraction)
    cut_short(tmp_path / "data_100" / checkpointing.CHECKPOINT_DIR / "10")
    cut_short(tmp_path / "data_100" / checkpointing.CHECKPOINT_DIR / "30")
    runs = [checkpointing.open_run(run) for run in checkpointing.find_runs(tmp_path)]
    with pytest.warns(UserWarning, match=r"data_100/checkpoints/30 could not be read") as caught:
        report = emergence.emergence(tmp_path, runs, thresholds=(1e-4,),
                                     relative_thresholds=(0.01,), sparsities=(0.5,), plots=False)
    assert any("data_100/checkpoints/10 could not be read" in str(w.message) for w in caught)
    data_60, data_100 = report["runs"]
    assert [r["step"] for r in data_60["steps"]] == list(STEPS)
    assert [r["step"] for r in data_100["steps"]] == [0, 20]
    assert data_100["skipped_steps"] == [10, 30]
    assert data_100["steps"][-1]["masks"][0]["final"]["iou"] == pytest.approx(1.0)


def test_non_finite_parameters_are_refused_naming_the_run_and_step(tmp_path):
    def read_params(step: int) -> Any:
        params = bert_like_params(step, tiny_counts(step))
        if step == 20:
            params["bert"]["encoder"]["layers"]["1"]["mlp"]["up"]["kernel"][0, 0] = np.nan
        return params

    (tmp_path / "diverged").mkdir()
    run = MemoryRun(tmp_path / "diverged", list(STEPS), {}, read_params)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'diverged'}, step 20: .*NaN or inf"):
        emergence.analyse_run(run)
