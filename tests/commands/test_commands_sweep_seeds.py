"""Fine-tune tasks over seeds: every level fine-tuned once a seed (each seed its own head, data
order and held-out split), mean and std stored, essential sparsity by the paper's rule on the means
and by the noise-aware rule against the seed spread, resumable per (level, seed), seeds in the
fingerprint; zero-shot entries refuse seeds."""

import csv
import hashlib
import json

import ml_collections
import numpy as np
import pytest
from flax import nnx

from es_jax import models
from es_jax.commands import sweep, sweep_config, sweep_plan
from es_jax.commands import sweep_results as results
from es_jax.train import finetune

TINY_VIT = models.TINY_HF_CONFIGS["vit"]
EPSILON = ml_collections.ConfigDict({"absolute": 1.0, "relative": 0.01})


def seeded_config(seeds=(0, 1)) -> ml_collections.ConfigDict:
    """A tiny ViT fine-tuned on digits (two steps) at levels 0 and 0.5, over `seeds`."""
    config = sweep_config.default_config()
    config.grid = (0.0, 0.5)
    config.models = ml_collections.ConfigDict()
    config.models.vit = sweep_config.model_settings(
        tiny=TINY_VIT, tasks=("digits",), image_size=32, max_examples=12, batch_size=4,
        seeds=seeds, finetune={"total_steps": 2, "batch_size": 4, "num_epochs": 1,
                               "learning_rate": 1e-3},
    )
    return config


def test_finalise_judges_means_by_epsilon_and_drops_by_the_seed_spread():
    record = {
        "metric": "accuracy", "higher_is_better": True, "dense": 80.0, "dense_std": 3.0,
        "levels": [{"sparsity": s, "value": v, "std": d} for s, v, d in
                   [(0.0, 80.0, 3.0), (0.3, 78.0, 4.0), (0.5, 72.0, 1.0), (0.7, 60.0, 0.0)]],
    }
    results.finalise(record, EPSILON)
    noises = [lv["noise"] for lv in record["levels"]]
    np.testing.assert_allclose(noises, [np.sqrt(18.0), 5.0, np.sqrt(10.0), 3.0])
    # drops 0, 2, 8, 20: 2 > epsilon but < 5 (the spread); 8 > sqrt(10)
    assert [lv["beyond_noise"] for lv in record["levels"]] == [False, False, True, True]
    assert record["essential_sparsity"] == 0.0
    assert record["essential_sparsity_noise_aware"] == 0.3


def test_a_run_without_seeds_gets_no_noise_fields():
    record = {"metric": "accuracy", "higher_is_better": True, "dense": 80.0,
              "levels": [{"sparsity": 0.0, "value": 80.0}, {"sparsity": 0.5, "value": 70.0}]}
    results.finalise(record, EPSILON)
    assert "essential_sparsity_noise_aware" not in record
    assert "noise" not in record["levels"][1]


def old_fingerprint(key, settings, config) -> str:
    """The fingerprint before seeds, labels_per_class, dtype and normalisation existed."""
    relevant = settings.to_dict()
    for name in ("tasks", "scorers", "patterns", "seeds", "labels_per_class", "dtype"):
        relevant.pop(name)
    relevant.update(key=key, seed=config.seed, data_dir=config.data_dir)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[
        :16]


def test_seeds_enter_the_fingerprint_only_when_given():
    config = seeded_config(seeds=())
    settings = config.models.vit
    assert results.fingerprint("vit", settings, config) == old_fingerprint("vit", settings, config)
    default = sweep_config.default_config()
    for key, entry in default.models.items():
        assert results.fingerprint(key, entry, default) == old_fingerprint(key, entry, default)
    stamps = {results.fingerprint("vit", seeded_config(s).models.vit, config)
              for s in ((), (0, 1), (0, 2), [0, 1])}
    assert len(stamps) == 3  # a list and a tuple of the same seeds are the same seeds


@pytest.mark.parametrize(
    ("seeds", "tasks", "message"),
    [
        ((0, 0), ("digits",), "distinct non-negative integers"),
        ((-1,), ("digits",), "distinct non-negative integers"),
        ((0, 1), ("digits_knn",), r"zero-shot and evaluated once; set seeds=\(\)"),
    ],
)
def test_bad_seeds_are_refused_before_any_work(tmp_path, seeds, tasks, message):
    config = seeded_config(seeds)
    config.models.vit.tasks = tasks
    with pytest.raises(ValueError, match=message):
        sweep.run(config, tmp_path, progress=False)
    assert not (tmp_path / "results.json").exists()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """The seeded sweep run once: (config, workdir, results)."""
    workdir = tmp_path_factory.mktemp("seeded")
    config = seeded_config()
    return config, workdir, sweep.run(config, workdir, progress=False)


def direct_value(config, seed, mask=None) -> float:
    """Digits accuracy of the entry fine-tuned with `seed`, computed outside the sweep."""
    setup = sweep.finetune_setup(config.models.vit, "digits", seed, config.data_dir)
    trained, _ = finetune.finetune(setup.model_fn, mask, setup.data.train, setup.ft_config, seed)
    return setup.data.evaluator(nnx.state(trained, nnx.Param))


def test_every_level_stores_each_seeds_value_their_mean_and_std(seeded):
    config, _, found = seeded
    (run,) = found["runs"]
    assert run["seeds"] == [0, 1]
    assert run["dense_values"] == pytest.approx([direct_value(config, 0), direct_value(config, 1)])
    assert run["dense"] == pytest.approx(np.mean(run["dense_values"]))
    assert run["dense_std"] == pytest.approx(np.std(run["dense_values"], ddof=1))
    for level in run["levels"]:
        assert level["seeds"] == [0, 1]
        assert level["value"] == pytest.approx(np.mean(level["values"]))
        assert level["std"] == pytest.approx(np.std(level["values"], ddof=1))
        assert level["noise"] == pytest.approx(np.hypot(run["dense_std"], level["std"]))
    assert run["levels"][0]["values"] == run["dense_values"]
    assert "essential_sparsity_noise_aware" in run
    assert found["pending"] == {}


def test_each_seed_fine_tunes_with_its_own_head_and_split():
    config = seeded_config()
    first = sweep.finetune_setup(config.models.vit, "digits", 0, "")
    second = sweep.finetune_setup(config.models.vit, "digits", 1, "")
    head = lambda setup: np.asarray(nnx.state(setup.model, nnx.Param)["classifier"]["kernel"])
    assert not np.array_equal(head(first), head(second))
    backbone = lambda setup: np.asarray(
        nnx.state(setup.model, nnx.Param)["vit"]["encoder"]["layers"][0]["mlp"]["up"]["kernel"])
    np.testing.assert_array_equal(backbone(first), backbone(second))


def test_the_csv_and_summary_name_both_essential_sparsities(seeded):
    _, workdir, found = seeded
    rows = list(csv.DictReader((workdir / "results.csv").open()))
    assert len(rows) == 2
    assert rows[1]["seeds"] == "0 1"
    assert float(rows[1]["std"]) == pytest.approx(found["runs"][0]["levels"][1]["std"])
    assert rows[1]["essential_sparsity_noise_aware"] != ""
    summary = (workdir / "summary.md").read_text()
    assert "essential sparsity (paper: mean drop <= epsilon)" in summary
    assert "essential sparsity (noise-aware: drop > epsilon and > seed spread)" in summary
    assert " ± " in summary


def test_the_plan_counts_one_evaluation_a_seed(seeded):
    config, _, _ = seeded
    (load,) = sweep_plan.plan(config, {})
    assert load.seeds == (0, 1)
    assert sweep_plan.evaluations([load]) == 2 * (1 + 1)  # (dense + one level) x two seeds


def test_a_crash_between_seeds_resumes_with_the_seeds_left(tmp_path, seeded, monkeypatch):
    config, _, found = seeded
    original = sweep.Evaluator.__call__
    calls = []

    def crash_on_fourth(self, params):
        calls.append(1)
        if len(calls) == 4:  # dense seeds 0, 1; level 0.5 seed 0; crash on its seed 1
            raise RuntimeError("simulated crash")
        return original(self, params)

    monkeypatch.setattr(sweep.Evaluator, "__call__", crash_on_fourth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sweep.run(config, tmp_path, progress=False)
    stored = json.loads((tmp_path / "results.json").read_text())
    (pending,) = stored["pending"].values()
    assert list(pending["values"]) == ["0"]
    assert [lv["sparsity"] for lv in stored["runs"][0]["levels"]] == [0.0]
    counted = []
    monkeypatch.setattr(
        sweep.Evaluator, "__call__", lambda self, p: counted.append(1) or original(self, p)
    )
    resumed = sweep.run(config, tmp_path, progress=False)
    assert len(counted) == 1  # only seed 1 of level 0.5
    assert resumed["pending"] == {}
    level = resumed["runs"][0]["levels"][1]
    assert level["values"] == pytest.approx(found["runs"][0]["levels"][1]["values"])


def test_other_seeds_make_stored_runs_stale(tmp_path, seeded):
    config, workdir, _ = seeded
    config = seeded_config(seeds=(0, 2))
    with pytest.raises(ValueError, match="computed with other settings"):
        sweep.run(config, workdir, progress=False)


def test_the_drop_plot_bars_each_level_with_its_seed_spread(seeded, tmp_path, monkeypatch):
    import matplotlib.axes

    from es_jax.analysis import plots

    _, _, found = seeded
    bars = []
    original = matplotlib.axes.Axes.errorbar

    def record(self, x, y, yerr=None, **kwargs):
        bars.append(yerr)
        return original(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", record)
    path = plots.plot_drops(found["runs"], tmp_path / "drops.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert bars == [[level["noise"] for level in found["runs"][0]["levels"]]]
