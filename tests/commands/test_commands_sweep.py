"""`es-jax sweep`: its config, bad input refused up front, an end-to-end tiny sweep that writes
results.json/CSV/plots, compiles each evaluator once, and resumes from its plan without redoing."""

import copy
import json

import ml_collections
import numpy as np
import pytest

from es_jax import models
from es_jax.commands import sweep, sweep_config, sweep_plan
from es_jax.commands import sweep_results as results

TINY_BERT = {**models.TINY_HF_CONFIGS["bert"], "max_position_embeddings": 64}
TINY_LLAMA = {**models.TINY_HF_CONFIGS["llama"], "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def tiny_config(data_dir: str) -> ml_collections.ConfigDict:
    """A small sweep: tiny BERT on Lee and WordSim-353, tiny Llama perplexity, 4 levels."""
    config = sweep_config.default_config()
    config.grid = (0.0, 0.3, 0.6, 0.9)
    config.data_dir = data_dir
    config.models = ml_collections.ConfigDict()
    config.models.bert = sweep_config.model_settings(
        tiny=TINY_BERT,
        tasks=("lee", "wordsim353"),
        scorers=("magnitude", "random"),
        patterns=("global", "2:4"),
        max_length=32,
        max_examples=20,
        batch_size=8,
    )
    config.models.llama = sweep_config.model_settings(
        tiny=TINY_LLAMA,
        tasks=("wikitext",),
        scorers=("magnitude", "wanda"),
        patterns=("global",),
        lm_length=32,
        lm_blocks=6,
        batch_size=8,
        calibration_blocks=2,
        calibration_length=32,
    )
    return config


def test_default_config_is_the_embedded_offline_sweep():
    config = sweep_config.default_config()
    assert config.grid == tuple(round(0.1 * i, 1) for i in range(10))
    assert set(config.models.minilm.tasks) == {"lee", "wordsim353", "simlex999"}
    assert config.models.smollm2.tasks == ("wikitext",)
    assert set(config.models.smollm2.scorers) == {"magnitude", "wanda"}


def test_unknown_model_setting_is_refused():
    with pytest.raises(ValueError, match="unknown model setting 'scorer'"):
        sweep_config.model_settings(scorer="magnitude")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: setattr(c.models.bert, "tasks", ("nope",)), "unknown task 'nope'"),
        (lambda c: setattr(c.models.bert, "patterns", ("diagonal",)), "unknown pattern"),
        (lambda c: setattr(c.models.bert, "patterns", ("4:2",)), "0 < N < M"),
        (lambda c: setattr(c.models.bert, "scorers", ("gradient",)), "unknown scorer"),
        (lambda c: setattr(c, "grid", (0.0, 1.5)), r"outside \[0, 1\)"),
        (lambda c: setattr(c, "grid", (-0.1, 0.5)), r"outside \[0, 1\)"),
        (
            lambda c: setattr(c.models.bert, "tasks", ("wikitext",)),
            "needs a model of kind 'causal_lm'",
        ),
        (lambda c: setattr(c.models.llama, "tasks", ("lee",)), "needs a model of kind 'encoder'"),
        (lambda c: setattr(c.models.bert, "tasks", ("cifar10",)), "'image_classification'"),
        (lambda c: setattr(c.models.bert, "tasks", ("lee", "glue/sst2")), "mix zero-shot"),
        (
            lambda c: c.models.bert.update({"tasks": ("glue/sst2",), "finetune": {"lr": 1.0}}),
            "unknown fine-tuning settings",
        ),
        (lambda c: c.models.bert.tiny.update({"model_type": "gpt9"}), "Unsupported architecture"),
    ],
)
def test_bad_input_is_refused_before_any_work(tmp_path, data_dir, change, message):
    config = tiny_config(data_dir)
    change(config)
    with pytest.raises(ValueError, match=message):
        sweep.run(config, tmp_path, progress=False)
    assert not (tmp_path / "results.json").exists()


def test_unknown_model_name_is_refused(tmp_path, data_dir):
    config = tiny_config(data_dir)
    config.models.bert.tiny = ml_collections.ConfigDict()
    config.models.bert.name = "./no/such/model"
    with pytest.raises((ValueError, FileNotFoundError), match=r"does not exist|not a bundled"):
        sweep.run(config, tmp_path, progress=False)


def test_pattern_levels():
    levels, pattern = sweep_plan.pattern_levels, sweep_config.parse_pattern
    assert levels(pattern("2:4"), (0.0, 0.1)) == [0.5]
    assert levels(pattern("1:4"), (0.0,)) == [0.75]
    assert levels(pattern("global"), (0.0, 0.1, 0.2)) == [0.1, 0.2]


def test_finalise_computes_drops_essential_and_epsilon():
    record = {
        "metric": "perplexity",
        "higher_is_better": False,
        "dense": 20.0,
        "levels": [
            {"sparsity": s, "value": v}
            for s, v in [(0.0, 20.0), (0.1, 20.1), (0.2, 20.15), (0.3, 20.5), (0.4, 40.0)]
        ],
    }
    epsilon = ml_collections.ConfigDict({"absolute": 1.0, "relative": 0.01})
    results.finalise(record, epsilon)
    assert record["epsilon"] == {"value": 0.01, "relative": True}
    assert record["tolerance"] == pytest.approx(0.2)
    assert record["essential_sparsity"] == 0.2
    np.testing.assert_allclose([lv["drop"] for lv in record["levels"]], [0, 0.1, 0.15, 0.5, 20])


def test_write_atomically_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "results.json"
    results.write_atomically(target, "{}")
    results.write_atomically(target, '{"a": 1}')
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """A tiny sweep run once for the module: (config, workdir, results)."""
    workdir = tmp_path_factory.mktemp("sweep")
    config = tiny_config(data_dir)
    return config, workdir, sweep.run(config, workdir, progress=False)


def test_results_follow_the_schema(finished):
    config, workdir, _ = finished
    runs = json.loads((workdir / "results.json").read_text())["runs"]
    keys = {(r["model"], r["task"], r["pattern"], r["scorer"]) for r in runs}
    assert keys == {
        ("bert", t, p, s)
        for t in ("lee", "wordsim353")
        for p in ("global", "2:4")
        for s in ("magnitude", "random")
    } | {("llama", "wikitext", "global", s) for s in ("magnitude", "wanda")}
    for run in runs:
        for field in ("metric", "higher_is_better", "dense", "essential_sparsity", "epsilon"):
            assert field in run
        sparsities = [level["sparsity"] for level in run["levels"]]
        expected = [0.0, 0.5] if run["pattern"] == "2:4" else list(config.grid)
        assert sparsities == expected
        for level in run["levels"]:
            assert set(level) >= {
                "sparsity",
                "measured_sparsity",
                "model_sparsity",
                "value",
                "drop",
            }
            assert level["measured_sparsity"] == pytest.approx(level["sparsity"], abs=1e-3)
            assert level["model_sparsity"] < level["measured_sparsity"] or level["sparsity"] == 0
        assert run["levels"][0]["value"] == run["dense"]


def test_wikitext_is_perplexity_with_a_relative_epsilon(finished):
    _, _, results = finished
    run = next(r for r in results["runs"] if r["task"] == "wikitext")
    assert run["metric"] == "perplexity"
    assert not run["higher_is_better"]
    assert run["epsilon"] == {"value": 0.01, "relative": True}
    assert run["dense"] > 1.0


def test_each_evaluator_compiles_once_for_all_levels(finished):
    _, _, results = finished
    assert results["compilations"] == {"bert/lee": 1, "bert/wordsim353": 1, "llama/wikitext": 1}


def test_csv_and_plots_are_written(finished):
    _, workdir, results = finished
    rows = (workdir / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + sum(len(r["levels"]) for r in results["runs"])
    for name in ("drops.png", "layers_bert.png", "components_bert.png", "layers_llama.png"):
        assert (workdir / name).read_bytes()[:4] == b"\x89PNG"


def test_the_plan_of_a_finished_sweep_is_empty_and_a_fresh_one_holds_everything(finished):
    config, _, results = finished
    assert sweep_plan.plan(config, {r["id"]: r for r in results["runs"]}) == []
    fresh = sweep_plan.plan(config, {})
    assert [(load.model, load.tasks, load.dense) for load in fresh] == [
        ("bert", ("lee", "wordsim353"), ("lee", "wordsim353")),
        ("llama", ("wikitext",), ("wikitext",)),
    ]
    # dense per task + (3 global levels + one 2:4 level) x 2 scorers x 2 tasks; 3 levels x 2 scorers
    assert sweep_plan.evaluations(fresh) == 2 + 4 * 2 * 2 + 1 + 3 * 2


def test_the_plan_lists_exactly_what_the_stored_runs_lack(finished):
    config, _, results = finished
    runs = {r["id"]: copy.deepcopy(r) for r in results["runs"]}
    lee = runs["bert|lee|global|random"]
    lee["levels"] = [level for level in lee["levels"] if level["sparsity"] != 0.6]
    runs["llama|wikitext|global|wanda"]["fingerprint"] = "of another config"
    lacking = tuple(sweep_plan.Level(s, ("wikitext",)) for s in (0.3, 0.6, 0.9))
    assert sweep_plan.plan(config, runs) == [
        sweep_plan.Load(
            "bert",
            ("lee", "wordsim353"),
            (),
            (sweep_plan.Curve("random", "global", (sweep_plan.Level(0.6, ("lee",)),)),),
            plots=True,
        ),
        sweep_plan.Load(
            "llama", ("wikitext",), (), (sweep_plan.Curve("wanda", "global", lacking),), plots=True
        ),
    ]


def test_a_finished_sweep_is_not_redone(finished, monkeypatch):
    config, workdir, results = finished

    def fail(*args, **kwargs):
        raise AssertionError("a finished sweep must not load any model")

    monkeypatch.setattr(sweep, "prepare", fail)
    again = sweep.run(config, workdir, progress=False)
    assert again["runs"] == results["runs"]


def one_curve_config(data_dir: str) -> ml_collections.ConfigDict:
    """The tiny sweep cut to one curve: tiny BERT, WordSim-353, global magnitude."""
    config = tiny_config(data_dir)
    config.models = ml_collections.ConfigDict({"bert": config.models.bert})
    config.models.bert.tasks = ("wordsim353",)
    config.models.bert.scorers = ("magnitude",)
    config.models.bert.patterns = ("global",)
    return config


def test_a_crashed_sweep_resumes_where_it_stopped(tmp_path, data_dir, monkeypatch):
    config = one_curve_config(data_dir)
    calls = []
    original = sweep.Evaluator.__call__

    def crash_on_fourth(self, params, *level):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return original(self, params, *level)

    monkeypatch.setattr(sweep.Evaluator, "__call__", crash_on_fourth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sweep.run(config, tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())["runs"][0]["levels"]
    assert [level["sparsity"] for level in saved] == [0.0, 0.3, 0.6]  # dense + 2 levels
    calls.clear()
    monkeypatch.setattr(sweep.Evaluator, "__call__", original)
    counted = []
    monkeypatch.setattr(
        sweep.Evaluator, "__call__", lambda self, *args: counted.append(1) or original(self, *args)
    )
    results = sweep.run(config, tmp_path, progress=False)
    assert len(counted) == 1  # only the level at 0.9; dense was stored too
    levels = results["runs"][0]["levels"]
    assert [level["sparsity"] for level in levels] == [0.0, 0.3, 0.6, 0.9]
    assert levels[1]["value"] == saved[1]["value"]


def test_refinement_levels_lie_between_essential_and_the_next_grid_level():
    config = sweep_config.default_config()
    config.refine = 3
    record = {
        "metric": "accuracy",
        "higher_is_better": True,
        "dense": 80.0,
        "levels": [{"sparsity": s, "value": 80.0 - 10 * s**3} for s in config.grid],
    }
    # drops 0.0, 0.01, 0.08, 0.27, 0.64, 1.25: essential 0.4
    levels = sweep_plan.refinement_of(record, sweep_config.parse_pattern("global"), config)
    np.testing.assert_allclose(levels, [0.425, 0.45, 0.475])
    assert sweep_plan.refinement_of(record, sweep_config.parse_pattern("2:4"), config) == []


def test_refinement_levels_are_evaluated_and_resumed(tmp_path, data_dir, monkeypatch):
    config = one_curve_config(data_dir)
    config.refine = 2
    monkeypatch.setattr(sweep_plan, "refinement_of", lambda record, pattern, config: [0.4, 0.5])
    run = sweep.run(config, tmp_path, progress=False)["runs"][0]
    assert [lv["sparsity"] for lv in run["levels"]] == [0.0, 0.3, 0.4, 0.5, 0.6, 0.9]
    assert run["levels"][3]["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)


def sequential_config(data_dir: str) -> ml_collections.ConfigDict:
    """A tiny Llama pruned by SparseGPT and by Wanda as its reference runs it."""
    config = tiny_config(data_dir)
    config.grid = (0.0, 0.5)
    del config.models.bert
    config.models.llama.scorers = ("sparsegpt",)
    config.models.llama.patterns = ("layerwise", "2:4")
    config.models.llama.sparsegpt_block_size = 16
    config.models.wanda = copy.deepcopy(config.models.llama)
    config.models.wanda.scorers = ("wanda_sequential",)
    config.models.wanda.patterns = ("per_output",)
    return config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: setattr(c.models.llama, "patterns", ("global",)),
         "sparsegpt prunes with the patterns 'layerwise' and N:M, not 'global'"),
        (lambda c: setattr(c.models.wanda, "patterns", ("layerwise",)),
         "wanda_sequential prunes with the patterns 'per_output'"),
        (lambda c: setattr(c.models.llama, "calibration_text", "wikipedia"),
         "is the text .* evaluate on"),
        (lambda c: setattr(c.models.llama, "calibration_text", "news"), "is not a corpus"),
        (lambda c: c.models.llama.update({"tiny": TINY_BERT, "tasks": ("lee",)}),
         "prunes a causal LM block by block"),
        (lambda c: setattr(c.models.llama, "sparsegpt_block_size", 0), "must be positive"),
    ],
)
def test_sequential_methods_refuse_what_they_cannot_do(tmp_path, data_dir, change, message):
    config = sequential_config(data_dir)
    change(config)
    with pytest.raises(ValueError, match=message):
        sweep.run(config, tmp_path, progress=False)


def test_sequential_methods_sweep_and_time_each_level(tmp_path, data_dir):
    config = sequential_config(data_dir)
    results = sweep.run(config, tmp_path, progress=False)
    runs = {(run["model"], run["pattern"]): run for run in results["runs"]}
    assert set(runs) == {("llama", "layerwise"), ("llama", "2:4"), ("wanda", "per_output")}
    for run in runs.values():
        pruned = [level for level in run["levels"] if level["sparsity"] > 0]
        assert [level["sparsity"] for level in pruned] == [0.5]
        assert abs(pruned[0]["measured_sparsity"] - 0.5) < 0.02
        assert pruned[0]["prune_seconds"] > 0
        assert np.isfinite(pruned[0]["value"])
        assert pruned[0]["value"] > run["dense"]
        assert run["scores_seconds"] == 0.0
    assert "prune_seconds" in (tmp_path / "results.csv").read_text().splitlines()[0]
