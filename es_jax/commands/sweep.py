"""`es-jax sweep`: prune a pre-trained model in one shot at a grid of sparsities and evaluate each.

For every model of the config: load it once, build one jitted evaluator per task (compiled once for
all levels), evaluate dense, then for each scorer (magnitude, Wanda, random) compute the scores
once and, for each pattern (global, layerwise, N:M), the nested masks of every level from that one
selection; apply each mask and evaluate every task on the pruned parameters. Each finished level is
written to `WORKDIR/results.json` atomically as soon as it is done, so a crash loses none and a
re-run skips finished levels. At the end: essential sparsity and knee per run, a CSV, and plots.

    es-jax sweep [--config FILE] [--config.key=value ...] [--workdir DIR]

With no `--config` the embedded default (`default_config()`) runs offline on the bundled models.
The config and its validation live in `es_jax.evaluate.sweep_config`, the results store, CSV
and tables in `es_jax.evaluate.results`; this module loads models, scores and masks them, and
runs the sweep.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from es_jax.analysis import essential
from es_jax.evaluate import tasks as task_registry
from es_jax.evaluate.evaluators import Evaluator, split_params
from es_jax.evaluate.results import (
    ResultsStore,
    finalise,
    fingerprint,
    level_of,
    levels_table,
    run_id,
    summary_table,
    write_csv,
)
from es_jax.evaluate.sweep_config import (
    HEAD_TASK,
    Pattern,
    finetune_config,
    parse_args,
    parse_pattern,
    validate,
)

# ----------------------------------------------------------------------------------------------
# Models, scores and masks.


def task_settings(config: Any, settings: Any) -> task_registry.TaskSettings:
    """The data and batching settings a task builder needs."""
    return task_registry.TaskSettings(
        data_dir=config.data_dir,
        seed=config.seed,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        word_max_length=settings.word_max_length,
        max_examples=settings.max_examples,
        lm_length=settings.lm_length,
        lm_blocks=settings.lm_blocks,
    )


def load_model(
    settings: Any, head: str, seed: int, num_labels: int | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer): the named checkpoint, or a random tiny model of `settings.tiny`.

    A new head (classification, QA) is initialised from `seed`, the same at every level.
    """
    from flax import nnx

    from es_jax import models
    from es_jax.models import hub

    task = HEAD_TASK[head]
    if not len(settings.tiny):
        return models.load(settings.name, task=task, num_labels=num_labels, seed=seed)
    hf_config = settings.tiny.to_dict()
    family = hub.family_for(hf_config["model_type"])
    model = family.build(
        family.config_from_hf(hf_config), task, rngs=nnx.Rngs(seed), num_labels=num_labels or 2
    )
    model.eval()
    if family.__name__.endswith(".vit"):
        return model, None
    tokenizer = hub.read_tokenizer(hub.resolve(settings.tokenizer, None))
    return model, tokenizer


def calibration_batches(tokenizer: Any, config: Any, settings: Any) -> list[dict]:
    """Wanda calibration inputs: blocks of Lee background news (not the evaluation text)."""
    from es_jax import data

    documents = data.documents("lee_background", config.data_dir or None)
    blocks = task_registry.lm_blocks(
        documents,
        tokenizer,
        settings.calibration_length,
        settings.calibration_blocks,
        settings.batch_size,
    )
    return [{k: b[k] for k in ("input_ids", "attention_mask")} for b in blocks]


def scores_of(
    scorer: str, model: Any, params: Any, where: str, tokenizer: Any, config: Any, settings: Any
) -> Any:
    """Pruning scores of the target weights: |W|, Wanda's |W| * ||X||, or random."""
    from es_jax import models, pruning

    if scorer == "magnitude":
        return pruning.magnitude(params, where=where)
    if scorer == "random":
        return pruning.random_scores(params, jax.random.key(config.seed), where=where)
    norms = models.activation_norms(model, calibration_batches(tokenizer, config, settings))
    return pruning.wanda(params, norms, where=where)


def masks_of(scores: Any, pattern: Pattern, sparsities: Sequence[float]) -> list[Any]:
    """One mask per sparsity: nested unstructured masks from one selection, or one N:M mask."""
    from es_jax import pruning

    if not sparsities:
        return []
    if pattern.is_n_of_m:
        return [pruning.n_of_m(scores, n=pattern.n, m=pattern.m)]
    return pruning.unstructured(scores, list(sparsities), scope=pattern.name)


def pattern_levels(pattern: Pattern, grid: Sequence[float]) -> list[float]:
    """The pruned levels of a pattern: the grid's non-zero sparsities, or 1 - N/M."""
    if pattern.is_n_of_m:
        return [round(1.0 - pattern.n / pattern.m, 6)]
    return [s for s in grid if s > 0.0]


# ----------------------------------------------------------------------------------------------
# The sweep.


@dataclass
class ModelRun:
    """One loaded model with its evaluators, parameters, target selector and level scoring."""

    key: str
    model: Any
    tokenizer: Any
    params: Any
    where: str
    evaluators: dict[str, Evaluator]
    # value(task, pruned params, mask or None for dense) -> metric; fine-tunes first if needed
    value: Callable[[str, Any, Any], float]


def prepare(key: str, settings: Any, config: Any, task_names: Sequence[str]) -> ModelRun:
    """Loads a model and builds one evaluator per task (data tokenised once)."""
    from es_jax import models

    if task_registry.get(task_names[0]).protocol == "finetune":
        return prepare_finetune(key, settings, config, task_names[0])
    head = task_registry.get(task_names[0]).head
    model, tokenizer = load_model(settings, head, config.seed)
    built = {
        name: task_registry.build_zero_shot(name, model, tokenizer, task_settings(config, settings))
        for name in task_names
    }
    _, params, _ = split_params(model)

    def value(name: str, pruned: Any, mask: Any) -> float:
        return built[name](pruned)

    return ModelRun(key, model, tokenizer, params, models.prunable(model), built, value)


def prepare_finetune(key: str, settings: Any, config: Any, task_name: str) -> ModelRun:
    """A fine-tune task: every level fine-tunes the pre-trained model with its mask fixed.

    The pre-trained weights, the new head's initialisation, the dropout stream and the data
    order are the same at every level (es_jax.train.finetune); only the mask differs.
    """
    from flax import nnx

    from es_jax import models
    from es_jax.train import finetune

    task = task_registry.get(task_name)
    ft_config = finetune_config(task_name, settings)
    model, tokenizer = load_model(
        settings, task.head, config.seed, task_registry.num_labels(task_name)
    )
    data = task_registry.build_finetune(
        task_name,
        model,
        tokenizer,
        task_registry.FinetuneSettings(
            data_dir=config.data_dir,
            seed=config.seed,
            batch_size=settings.batch_size,
            train_batch_size=ft_config.batch_size,
            num_epochs=ft_config.num_epochs,
            max_length=settings.max_length,
            max_examples=settings.max_examples,
            max_train_examples=settings.max_train_examples,
            doc_stride=settings.doc_stride,
            image_size=settings.image_size,
        ),
    )
    graphdef, params, rest = split_params(model)

    def value(name: str, pruned: Any, mask: Any) -> float:
        trained, _ = finetune.finetune(
            lambda rngs: nnx.merge(graphdef, params, rest), mask, data.train, ft_config, config.seed
        )
        return data.evaluator(nnx.state(trained, nnx.Param))

    evaluators = {task_name: data.evaluator}
    return ModelRun(key, model, tokenizer, params, models.prunable(model), evaluators, value)


def measured(params: Any, where: str) -> tuple[float, float]:
    """Sparsity of the target set and of the whole model."""
    from es_jax import pruning

    report = pruning.report(params, where=where)
    return float(report["target"]["sparsity"]), float(report["model"]["sparsity"])


def todo_count(store: ResultsStore, config: Any) -> int:
    """Evaluations left on the grid: dense per (model, task) plus every unfinished level."""
    total = 0
    for key, settings in config.models.items():
        stamp = fingerprint(key, settings, config)
        total += len(settings.tasks)
        for task_name in settings.tasks:
            for scorer in settings.scorers:
                for pattern_text in settings.patterns:
                    record = store.runs.get(run_id(key, task_name, pattern_text, scorer))
                    fresh = record is None or record.get("fingerprint") != stamp
                    for sparsity in pattern_levels(parse_pattern(pattern_text), config.grid):
                        total += fresh or level_of(record, sparsity) is None
    return total


def refinement_of(record: dict, pattern: Pattern, config: Any) -> list[float]:
    """The refinement levels a run asks for, from its grid levels so far (none for N:M)."""
    if not config.refine or pattern.is_n_of_m or record["dense"] is None:
        return []
    coarse = {
        **record,
        "levels": [dict(lv) for lv in record["levels"] if lv["sparsity"] in config.grid],
    }
    found = finalise(coarse, config.epsilon)["essential_sparsity"]
    return essential.refinement_levels(config.grid, found, config.refine)


def model_is_done(
    store: ResultsStore,
    key: str,
    settings: Any,
    config: Any,
    task_names: Sequence[str] | None = None,
) -> bool:
    """True when every level (refinements included) of these tasks' runs is stored."""
    stamp = fingerprint(key, settings, config)
    for task_name in settings.tasks if task_names is None else task_names:
        for scorer in settings.scorers:
            for pattern_text in settings.patterns:
                pattern = parse_pattern(pattern_text)
                record = store.runs.get(run_id(key, task_name, pattern_text, scorer))
                if record is None or record.get("fingerprint") != stamp or record["dense"] is None:
                    return False
                levels = pattern_levels(pattern, config.grid)
                levels += refinement_of(record, pattern, config)
                if any(level_of(record, s) is None for s in levels):
                    return False
    return True


@dataclass
class LevelContext:
    """What evaluating levels of one (model, scorer, pattern) needs."""

    prepared: ModelRun
    records: dict[str, dict]
    store: ResultsStore
    bar: tqdm
    apply: Any
    label: str


def evaluate_levels(context: LevelContext, masks: Sequence[Any], todo: dict[float, list]) -> None:
    """Applies each mask and evaluates the listed tasks; saves after every level."""
    prepared = context.prepared
    for (sparsity, names), mask in zip(todo.items(), masks, strict=True):
        pruned = context.apply(prepared.params, mask)
        target_sparsity, model_sparsity = measured(pruned, prepared.where)
        for name in names:
            context.bar.set_description(f"{prepared.key}/{name} {context.label} {sparsity:.2f}")
            context.records[name]["levels"].append(
                {
                    "sparsity": sparsity,
                    "measured_sparsity": target_sparsity,
                    "model_sparsity": model_sparsity,
                    "value": prepared.value(name, pruned, mask),
                }
            )
            context.store.save()
            context.bar.update(1)


def dense_values(
    prepared: ModelRun, settings: Any, store: ResultsStore, stamp: str, bar: tqdm
) -> dict[str, float]:
    """The dense metric of every task (reused from any stored run with the same fingerprint)."""
    values = {}
    for name in prepared.evaluators:
        cached = [
            record["dense"]
            for p in settings.patterns
            for s in settings.scorers
            if (record := store.runs.get(run_id(prepared.key, name, p, s)))
            and record["fingerprint"] == stamp
            and record["dense"] is not None
        ]
        bar.set_description(f"{prepared.key}/{name} dense")
        values[name] = cached[0] if cached else prepared.value(name, prepared.params, None)
        bar.update(1)
    return values


def open_records(
    prepared: ModelRun,
    store: ResultsStore,
    pattern_text: str,
    scorer: str,
    stamp: str,
    dense: dict[str, float],
    dense_sparsity: tuple[float, float],
    config: Any,
) -> dict[str, dict]:
    """The run records of one (scorer, pattern) for every task, with dense and level 0 filled."""
    records = {}
    for name, evaluator in prepared.evaluators.items():
        record = store.run(prepared.key, task_registry.get(name), pattern_text, scorer, stamp)
        record["dense"] = dense[name]
        record["num_examples"] = evaluator.num_examples
        if 0.0 in config.grid and level_of(record, 0.0) is None:
            record["levels"].append(
                {
                    "sparsity": 0.0,
                    "measured_sparsity": dense_sparsity[0],
                    "model_sparsity": dense_sparsity[1],
                    "value": dense[name],
                }
            )
        records[name] = record
    store.save()
    return records


def plot_level(config: Any) -> float:
    """The grid level nearest to `plot_sparsity` (above 0), whose mask the mask plots show."""
    levels = [s for s in config.grid if s > 0.0] or [config.plot_sparsity]
    return min(levels, key=lambda s: abs(s - config.plot_sparsity))


def sweep_model(
    key: str, settings: Any, config: Any, store: ResultsStore, bar: tqdm, workdir: Path
) -> None:
    """All runs of one model: zero-shot tasks share one load; each fine-tune task has its own."""
    zero_shot = task_registry.get(settings.tasks[0]).protocol == "zero_shot"
    groups = [tuple(settings.tasks)] if zero_shot else [(task,) for task in settings.tasks]
    for i, task_names in enumerate(groups):
        if model_is_done(store, key, settings, config, task_names):
            continue
        prepared = prepare(key, settings, config, task_names)
        sweep_prepared(prepared, settings, config, store, bar, workdir if i == 0 else None)


def sweep_prepared(
    prepared: ModelRun,
    settings: Any,
    config: Any,
    store: ResultsStore,
    bar: tqdm,
    plot_dir: Path | None,
) -> None:
    """Dense, then every scorer x pattern x level of the prepared tasks; mask plots if asked."""
    from es_jax import pruning

    key = prepared.key
    stamp = fingerprint(key, settings, config)
    dense_sparsity = measured(prepared.params, prepared.where)
    dense = dense_values(prepared, settings, store, stamp, bar)
    apply = jax.jit(pruning.apply)
    plot_scorer, plotted = settings.scorers[0], plot_dir is None
    unstructured = [p for p in map(parse_pattern, settings.patterns) if not p.is_n_of_m]
    plot_pattern = unstructured[0] if unstructured else Pattern("layerwise")
    for scorer in settings.scorers:
        bar.set_description(f"{key} {scorer} scores")
        scores = scores_of(
            scorer,
            prepared.model,
            prepared.params,
            prepared.where,
            prepared.tokenizer,
            config,
            settings,
        )
        for pattern_text in settings.patterns:
            pattern = parse_pattern(pattern_text)
            records = open_records(
                prepared, store, pattern_text, scorer, stamp, dense, dense_sparsity, config
            )
            context = LevelContext(prepared, records, store, bar, apply, f"{pattern_text}/{scorer}")
            todo = missing_levels(records, pattern_levels(pattern, config.grid))
            masks = masks_of(scores, pattern, list(todo))
            wanted = not plotted and scorer == plot_scorer and pattern == plot_pattern
            if wanted and plot_level(config) in todo:
                level_mask = masks[list(todo).index(plot_level(config))]
                plot_masks(prepared, level_mask, f"{plot_pattern.name} {scorer}", config, plot_dir)
                plotted = True
            evaluate_levels(context, masks, todo)
            del masks
            refine = {s: [] for r in records.values() for s in refinement_of(r, pattern, config)}
            todo = missing_levels(records, sorted(refine))
            bar.total += sum(len(names) for names in todo.values())
            evaluate_levels(context, masks_of(scores, pattern, list(todo)), todo)
        if scorer == plot_scorer and not plotted:
            (mask,) = masks_of(scores, plot_pattern, [plot_level(config)])
            plot_masks(prepared, mask, f"{plot_pattern.name} {scorer}", config, plot_dir)
            plotted = True
        del scores
    for name, evaluator in prepared.evaluators.items():
        store.compilations[f"{key}/{name}"] = evaluator.compilations()
    store.save()


def missing_levels(records: dict[str, dict], sparsities: Sequence[float]) -> dict[float, list]:
    """{sparsity: [tasks without that level]} for the sparsities some task still lacks."""
    todo = {}
    for sparsity in sparsities:
        names = [name for name, record in records.items() if level_of(record, sparsity) is None]
        if names:
            todo[sparsity] = names
    return todo


def plot_masks(
    prepared: ModelRun, mask: Any, scorer: str, config: Any, workdir: Path
) -> list[Path]:
    """Per-layer sparsity and the component view (paper's Figure 1) of one mask.

    `scorer` names the mask in the title, e.g. "global magnitude".
    """
    from es_jax import pruning
    from es_jax.analysis import plots

    report = pruning.report(pruning.apply(prepared.params, mask), where=prepared.where)
    leaf_sparsity = {
        path: float(leaf["sparsity"]) for path, leaf in report["leaves"].items() if leaf["target"]
    }
    title = f"{prepared.key}: {scorer} mask at {100 * plot_level(config):g}% sparsity"
    component_masks = {
        path: np.asarray(leaf)
        for path, leaf in zip(pruning.leaf_paths(mask), jax.tree.leaves(mask), strict=True)
    }
    return [
        plots.plot_layer_sparsity(leaf_sparsity, workdir / f"layers_{prepared.key}.png", title),
        plots.plot_component_masks(
            component_masks, workdir / f"components_{prepared.key}.png", title
        ),
    ]


def iter_models(config: Any) -> Iterator[tuple[str, Any]]:
    """(key, settings) of every model entry, in config order."""
    yield from config.models.items()


def run(config: ml_collections.ConfigDict, workdir: str | Path, progress: bool = True) -> dict:
    """Runs (or resumes) the sweep; writes results.json, results.csv and plots; returns results."""
    from es_jax.analysis import plots

    validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    store = ResultsStore(workdir, config)
    start = time.perf_counter()
    with tqdm(total=todo_count(store, config), disable=not progress, unit="eval") as bar:
        for key, settings in iter_models(config):
            if model_is_done(store, key, settings, config):
                continue
            sweep_model(key, settings, config, store, bar, workdir)
    wanted = {
        run_id(key, t, p, s)
        for key, settings in iter_models(config)
        for t in settings.tasks
        for p in settings.patterns
        for s in settings.scorers
    }
    runs = [finalise(store.runs[rid], config.epsilon) for rid in store.runs if rid in wanted]
    store.runs = {r["id"]: r for r in runs}
    store.save()
    write_csv(runs, workdir / "results.csv")
    plots.plot_drops(runs, workdir / "drops.png")
    (workdir / "summary.md").write_text(summary_table(runs) + "\n\n" + levels_table(runs) + "\n")
    results = json.loads(store.path.read_text())
    results["seconds"] = time.perf_counter() - start
    return results


def main(argv: list[str]) -> None:
    """`es-jax sweep` entry point."""
    try:
        config, workdir = parse_args(argv)
        results = run(config, workdir)
    except ValueError as error:
        raise SystemExit(f"es-jax sweep: {error}") from error
    print(summary_table(results["runs"]))
    print(f"\nresults: {workdir / 'results.json'}, {workdir / 'results.csv'}, plots in {workdir}")
