"""`es-jax sweep`: prune pre-trained models in one shot at a grid of sparsities and evaluate each.

    es-jax sweep [--config FILE[:tiny]] --workdir DIR [--config.key=value ...]

With no `--config` the embedded default (`sweep_config.default_config()`) runs offline on the
bundled models. `run` asks the plan (`sweep_plan.plan`: the config and what results.json already
holds -> the loads still to do) and executes it: for each load, the model is loaded once with one
jitted evaluator per task (compiled once for all levels) and its dense values evaluated; then for
each scorer (magnitude, Wanda, random) the scores are computed once (magnitude's inside the
selection, from the weights) and, for each pattern (global, layerwise, per_output, N:M), every
level left comes from one selection as one uint8 per target weight (`sweep_levels`); each task
lacking a level evaluates the dense parameters with that level's weights zeroed inside its
compiled forward pass, so no pruned copy of the weights is ever held. The sequential methods
(SparseGPT, Wanda as its reference runs it) prune the model block by block on calibration text
once per level instead (`models.prune_sequential`). Each level records how long its pruning
took. Weights load in the entry's `dtype`. Zero-shot entries run on the mesh of `config.mesh`:
parameters and level arrays sharded by `es_jax.mesh.state_shardings`, evaluation batches split
over every device, results replicated; on several hosts, host 0 alone writes. A
fine-tune task fine-tunes every level (and dense) once per seed of its entry, each seed with its
own head, data order and held-out split (`finetune_setup`); the level stores the seeds' values,
their mean and standard deviation. Each finished level (and each seed of an unfinished one) is
written to `WORKDIR/results.json` atomically, so a crash loses none and a re-run resumes from
the plan. At the end: essential sparsity (the paper's rule, and the noise-aware one where there
are seeds) and knee per run, a CSV, a summary and plots.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from es_jax import mesh as mesh_lib
from es_jax.analysis import essential
from es_jax.commands import command_line, sweep_plan
from es_jax.commands.sweep_config import (
    CHECKPOINT_PREFIX,
    HEAD_TASK,
    Pattern,
    checkpoint_source,
    default_config,
    finetune_config,
    image_normalisation,
    param_dtype,
    parse_pattern,
    run_seeds,
    validate,
)
from es_jax.commands.sweep_levels import (
    Pruned,
    ScoreMethod,
    SequentialMethod,
    mask_of,
    method_of,
    place,
    unpruned_levels,
)
from es_jax.commands.sweep_results import (
    ResultsStore,
    exclusive,
    finalise,
    fingerprint,
    is_writer,
    level_of,
    levels_table,
    read_results,
    summary_table,
    write_csv,
)
from es_jax.evaluate import tasks as task_registry
from es_jax.evaluate.evaluators import DENSE, Evaluator, split_params

SUMMARY = "One-shot pruning sweep: evaluate every level, find the essential sparsity, plot."
DEFAULT_CONFIG = default_config


def main(argv: Sequence[str]) -> None:
    """`es-jax sweep`: parses the command line and runs the sweep."""
    config, workdir = command_line.parse("sweep", argv, DEFAULT_CONFIG)
    results = run(config, workdir)
    print(summary_table(results["runs"]))
    print(f"\nresults: {workdir / 'results.json'}, {workdir / 'results.csv'}, plots in {workdir}")


def run(config: ml_collections.ConfigDict, workdir: str | Path, progress: bool = True) -> dict:
    """Runs (or resumes) the sweep; writes results.json, results.csv and plots; returns results."""
    validate(config)
    workdir = command_line.check_workdir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with exclusive(workdir):
        store = ResultsStore(workdir, config)
        check_stale(config, store)
        loads = sweep_plan.plan(config, store.runs)
        visible = progress and is_writer()
        with tqdm(total=sweep_plan.evaluations(loads), disable=not visible, unit="eval") as bar:
            for load in loads:
                execute(load, config, store, bar, workdir)
        finish(config, store, workdir)
    mesh_lib.sync_hosts("sweep results written")  # host 0 wrote them; every host returns them
    results = read_results(store.path)
    results["seconds"] = time.perf_counter() - start
    return results


def check_stale(config: ml_collections.ConfigDict, store: ResultsStore) -> None:
    """Refuses to recompute stored runs that the config computes with other settings, unless
    `config.overwrite`: a results store never drops a run it was not told to."""
    stale = sweep_plan.stale_runs(config, store.runs)
    if stale and not config.overwrite:
        raise ValueError(
            f"{store.path} holds {len(stale)} run(s) of this config computed with other settings "
            f"(another model, data or batch setting, seed or data_dir): {stale[:3]}; pass "
            "--config.overwrite=True to recompute and replace them, or use another --workdir."
        )


def finish(config: ml_collections.ConfigDict, store: ResultsStore, workdir: Path) -> None:
    """Essential sparsity and checkpoint name of every run of the config; results.json; the CSV,
    summary and plots of every complete run the store holds (this config's and any other's)."""
    from es_jax.analysis import plots

    for key, rid in sweep_plan.run_ids(config):
        store.runs[rid]["checkpoint"] = checkpoint_name(config.models[key])
        finalise(store.runs[rid], config.epsilon)
    store.save()
    if not is_writer():
        return
    runs = [run for run in store.runs.values() if "essential_sparsity" in run]
    write_csv(runs, workdir / "results.csv")
    plots.plot_drops(runs, workdir / "drops.png")
    (workdir / "summary.md").write_text(summary_table(runs) + "\n\n" + levels_table(runs) + "\n")


# ----------------------------------------------------------------------------------------------
# Models, scores and masks.


def task_settings(
    config: Any, settings: Any, mesh: Mesh | None = None
) -> task_registry.TaskSettings:
    """The data and batching settings a task builder needs, and the mesh it runs on (None: the
    default device)."""
    return task_registry.TaskSettings(
        data_dir=config.data_dir,
        seed=config.seed,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        word_max_length=settings.word_max_length,
        max_examples=settings.max_examples,
        lm_length=settings.lm_length,
        lm_blocks=settings.lm_blocks,
        mc_data=settings.mc_data,
        mc_shots=settings.mc_shots,
        mc_style=settings.mc_style,
        max_train_examples=settings.max_train_examples,
        labels_per_class=settings.labels_per_class,
        image_size=settings.image_size,
        normalisation=image_normalisation(settings),
        mesh=mesh,
    )


def sweep_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The mesh of `config.mesh` (data, fsdp) over every device."""
    return mesh_lib.from_config(config.mesh)


def entry_mesh(config: ml_collections.ConfigDict, task_names: Sequence[str]) -> Mesh | None:
    """The mesh a load runs on: `sweep_mesh` for zero-shot tasks; None (the default device) for
    a fine-tune task, which `es_jax.train.finetune` trains unsharded."""
    if task_registry.get(task_names[0]).protocol == "finetune":
        return None
    return sweep_mesh(config)


# Heads a sweep fine-tunes: always new, from the seed (never a pre-training run's own head).
FINETUNE_HEADS = ("classification", "qa")


def load_model(
    settings: Any, head: str, seed: int, num_labels: int | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer): the named checkpoint, a pre-training run's checkpoint
    ("checkpoint:RUN_DIR[@STEP]"), or a random tiny model of `settings.tiny`.

    A fine-tune head (classification, QA) is new, initialised from `seed` (the same at every
    level), on a backbone that does not depend on the seed: a tiny model's weights, which stand
    for pre-trained ones, are the random ones of seed 0 (`with_new_head`), and a pre-training
    run's own classifier is not kept (`load_checkpoint_model(new_head=True)`). Other models are
    loaded as they are, with `seed` for anything the checkpoint lacks. Parameters are of the
    entry's `dtype` (a checkpoint entry's are float32, which validation checks).
    """
    from es_jax import models

    task = HEAD_TASK[head]
    new_head = task in FINETUNE_HEADS
    source = checkpoint_source(settings)
    if source is not None:
        from es_jax.train.checkpoint_models import load_checkpoint_model

        return load_checkpoint_model(
            source, task=task, num_labels=num_labels, seed=seed, new_head=new_head
        )
    dtype = param_dtype(settings)
    if len(settings.tiny):
        model, tokenizer = tiny_model(settings, None if new_head else task, 0 if new_head else seed)
        if new_head:
            model = with_new_head(model, task, num_labels, seed, dtype)
        return model, tokenizer
    return models.load(
        settings.name, task=task, num_labels=num_labels, seed=seed, param_dtype=dtype
    )


def tiny_model(settings: Any, task: str | None, seed: int) -> tuple[Any, Any]:
    """A random model of the HF config fields `settings.tiny` for `task` (weights from `seed`,
    of the entry's `dtype`), with the tokenizer `settings.tokenizer` (None for images)."""
    import dataclasses

    from flax import nnx

    from es_jax import models
    from es_jax.models import hub

    hf_config = settings.tiny.to_dict()
    family = hub.family_for(hf_config["model_type"])
    config = dataclasses.replace(
        family.config_from_hf(hf_config), param_dtype=param_dtype(settings)
    )
    model = family.build(config, task, rngs=nnx.Rngs(seed))
    model.eval()
    if family is models.vit:  # images: no tokenizer
        return model, None
    return model, hub.read_tokenizer(hub.resolve(settings.tokenizer, None))


def with_new_head(
    backbone: Any, task: str, num_labels: int | None, seed: int, dtype: Any
) -> Any:
    """The model of `task` on `backbone`'s weights, its head new from `seed`, parameters of
    `dtype`: the backbone as a Hugging Face checkpoint (its family's tensors) loaded by
    `hub.from_hf`, as a hub backbone checkpoint gets a head."""
    from es_jax.models import hub

    family = hub.family_of(backbone)
    return hub.from_hf(
        family.config_to_hf(backbone.config),
        family.export_hf_tensors(backbone),
        task=task,
        num_labels=num_labels,
        seed=seed,
        param_dtype=dtype,
    )


# ----------------------------------------------------------------------------------------------
# The sweep.


@dataclass
class ModelRun:
    """One loaded model with its evaluators, parameters (placed on its mesh), target selector,
    mesh (None: the default device) and level scoring."""

    key: str
    model: Any
    tokenizer: Any
    params: Any
    where: str
    evaluators: dict[str, Evaluator]
    # value(task, level, seed or None) -> metric; fine-tunes first (with that seed's head, data
    # order and split, the level's mask fixed) if needed
    value: Callable[[str, Pruned, int | None], float]
    seeds: tuple[int, ...] = ()  # a fine-tune task's seeds; () = evaluated once (zero-shot)
    mesh: Mesh | None = None


def prepare(
    key: str, settings: Any, config: Any, task_names: Sequence[str], mesh: Mesh | None
) -> ModelRun:
    """Loads a model, places its parameters on the mesh (the model holds the placed ones: one
    copy) and builds one evaluator per task (data tokenised once) on that mesh."""
    from flax import nnx

    from es_jax import models

    if task_registry.get(task_names[0]).protocol == "finetune":
        return prepare_finetune(key, settings, config, task_names[0])
    head = task_registry.get(task_names[0]).head
    model, tokenizer = load_model(settings, head, config.seed)
    _, params, _ = split_params(model)
    params = place(params, mesh)
    nnx.update(model, params)
    built = {
        name: task_registry.build_zero_shot(
            name, model, tokenizer, task_settings(config, settings, mesh)
        )
        for name in task_names
    }

    def value(name: str, pruned: Pruned, seed: int | None) -> float:
        return built[name](pruned.params, pruned.levels, pruned.index)

    where = models.prunable(model)
    return ModelRun(key, model, tokenizer, params, where, built, value, mesh=mesh)


def prepare_finetune(key: str, settings: Any, config: Any, task_name: str) -> ModelRun:
    """A fine-tune task: every level fine-tunes the pre-trained model with its mask fixed, once
    per seed of the entry (`run_seeds`).

    For one seed the pre-trained weights, the new head's initialisation, the dropout stream, the
    data order and any held-out split are the same at every level (es_jax.train.finetune); only
    the mask differs. Each seed's model and data are set up on first use and kept; the masks
    come from the first seed's parameters (the heads, which differ, are not pruned).
    """
    from flax import nnx

    from es_jax import models
    from es_jax.train import finetune

    seeds = run_seeds(settings, config)
    setups: dict[int, FinetuneSetup] = {}

    def setup_of(seed: int) -> FinetuneSetup:
        if seed not in setups:
            setups[seed] = finetune_setup(settings, task_name, seed, config.data_dir)
        return setups[seed]

    first = setup_of(seeds[0])
    _, params, _ = split_params(first.model)

    def value(name: str, pruned: Pruned, seed: int | None) -> float:
        setup = setup_of(seed)
        trained, _ = finetune.finetune(
            setup.model_fn, mask_of(pruned), setup.data.train, setup.ft_config, seed
        )
        return setup.data.evaluator(nnx.state(trained, nnx.Param))

    evaluators = {task_name: first.data.evaluator}
    where = models.prunable(first.model)
    return ModelRun(key, first.model, first.tokenizer, params, where, evaluators, value, seeds)


class FinetuneSetup(NamedTuple):
    """What fine-tuning a model entry on one task needs: the pre-trained model with a new head
    (initialised from the seed), its tokenizer, the task's data (`task_registry.FinetuneData`),
    the fine-tuning config, and `model_fn(rngs)`, which rebuilds that very model for
    `finetune.finetune` (its `rngs` unused: the head is the seed's at every call)."""

    model: Any
    tokenizer: Any
    data: task_registry.FinetuneData
    ft_config: Any
    model_fn: Callable[[Any], Any]


def finetune_setup(settings: Any, task_name: str, seed: int, data_dir: str) -> FinetuneSetup:
    """Loads a model entry for a fine-tune task (head from `seed`) and builds the task's data
    with the entry's batching settings and `seed` (the data order; the held-out split of the
    tasks that draw one)."""
    from flax import nnx

    task = task_registry.get(task_name)
    ft_config = finetune_config(task_name, settings)
    model, tokenizer = load_model(settings, task.head, seed, task_registry.num_labels(task_name))
    data = task_registry.build_finetune(
        task_name,
        model,
        tokenizer,
        task_registry.FinetuneSettings(
            data_dir=data_dir,
            seed=seed,
            batch_size=settings.batch_size,
            train_batch_size=ft_config.batch_size,
            num_epochs=ft_config.num_epochs,
            max_length=settings.max_length,
            max_examples=settings.max_examples,
            max_train_examples=settings.max_train_examples,
            doc_stride=settings.doc_stride,
            image_size=settings.image_size,
            labels_per_class=settings.labels_per_class,
            normalisation=image_normalisation(settings),
        ),
    )
    graphdef, params, rest = split_params(model)
    return FinetuneSetup(
        model, tokenizer, data, ft_config, lambda rngs: nnx.merge(graphdef, params, rest)
    )


# ----------------------------------------------------------------------------------------------
# Executing one load of the plan.


@dataclass
class LoadContext:
    """One load being executed: the prepared model, its dense values, where results go."""

    prepared: ModelRun
    config: ml_collections.ConfigDict
    store: ResultsStore
    bar: tqdm
    stamp: str
    dense: dict[str, Measured]
    dense_sparsity: tuple[float, float]


class Measured(NamedTuple):
    """A task's metric at one level: its value, which is the seeds' mean when fine-tuned over
    seeds, with the seeds, their values and sample standard deviation (empty for zero-shot)."""

    value: float
    seeds: tuple[int, ...] = ()
    values: tuple[float, ...] = ()
    std: float = 0.0


def measure(
    context: LoadContext, pending: str, label: str, evaluate: Callable[[int | None], float]
) -> Measured:
    """`evaluate(seed)` for every seed of the load's model run (once, with None, when it has
    none).

    Each seed's value is stored under the store's pending key `pending` as soon as it is known
    (the caller saves the finished level, which clears it), so a re-run evaluates only the seeds
    a crash left. A value that is not finite is a ValueError naming `label` and the seed.
    """
    store, seeds, bar = context.store, context.prepared.seeds, context.bar
    if not seeds:
        value = finite(evaluate(None), label)
        bar.update(1)
        return Measured(value)
    done = store.pending_values(pending, context.stamp)
    for seed in seeds:
        if seed not in done:
            bar.set_description(f"{label}, seed {seed}")
            done[seed] = finite(evaluate(seed), f"{label}, seed {seed}")
            store.add_pending(pending, context.stamp, seed, done[seed])
            store.save()
        bar.update(1)
    values = tuple(done[seed] for seed in seeds)
    store.clear_pending(pending)
    spread = essential.seed_spread(values)
    return Measured(spread.mean, seeds, values, spread.std)


class MaskPlot(NamedTuple):
    """The mask the per-layer and component plots show: first scorer, first unstructured
    pattern (layerwise if none), the grid level nearest to `plot_sparsity`."""

    scorer: str
    pattern: Pattern
    sparsity: float


def execute(
    load: sweep_plan.Load,
    config: ml_collections.ConfigDict,
    store: ResultsStore,
    bar: tqdm,
    workdir: Path,
) -> None:
    """Everything one load of the plan holds: dense values, then each curve's levels; the mask
    plots on a model's first load; the evaluators' compilation counts."""
    settings = config.models[load.model]
    prepared = prepare(load.model, settings, config, load.tasks, entry_mesh(config, load.tasks))
    stamp = fingerprint(load.model, settings, config)
    dense = Pruned(
        prepared.params, unpruned_levels(prepared.params, prepared.where, prepared.mesh), DENSE, 0.0
    )
    context = LoadContext(prepared, config, store, bar, stamp, {}, measured(dense, prepared.mesh))
    context.dense = dense_values(context, load, settings, dense)
    del dense  # its zero levels array
    plot = mask_plot(settings, config) if load.plots else None
    for scorer in settings.scorers:
        curves = [curve for curve in load.curves if curve.scorer == scorer]
        if not curves and (plot is None or plot.scorer != scorer):
            continue
        bar.set_description(f"{load.model} {scorer} scores")
        method = method_of(scorer, prepared, config, settings)
        for curve in curves:
            plot = execute_curve(context, curve, method, plot, workdir)
        if plot is not None and plot.scorer == scorer:
            (level,) = method.levels(plot.pattern, [plot.sparsity])
            plot_masks(prepared, mask_of(level), plot, workdir)
            plot = None
        del method
    for name, evaluator in prepared.evaluators.items():
        store.compilations[f"{load.model}/{name}"] = evaluator.compilations()
    store.save()


def execute_curve(
    context: LoadContext,
    curve: sweep_plan.Curve,
    method: ScoreMethod | SequentialMethod,
    plot: MaskPlot | None,
    workdir: Path,
) -> MaskPlot | None:
    """The curve's levels, then any the plan adds once they are stored (refinement levels).

    Draws the mask plots if this curve evaluates the plotted level; returns the plot still to
    draw (None once drawn).
    """
    pattern = parse_pattern(curve.pattern)
    records = open_records(context, curve, method.seconds)
    levels = curve.levels
    while levels:
        sparsities = [level.sparsity for level in levels]
        plotted = plot_here(plot, curve.scorer, pattern, sparsities)
        label = f"{curve.pattern}/{curve.scorer}"
        for level, pruned in zip(levels, method.levels(pattern, sparsities), strict=True):
            if plotted and plot is not None and level.sparsity == plot.sparsity:
                plot_masks(context.prepared, mask_of(pruned), plot, workdir)
                plot = None
            evaluate_level(context, records, label, level, pruned)
        levels = sweep_plan.missing_levels(context.config, records, pattern)
        per_level = max(1, len(context.prepared.seeds))
        context.bar.total += per_level * sum(len(level.tasks) for level in levels)
    return plot


def plot_here(
    plot: MaskPlot | None, scorer: str, pattern: Pattern, sparsities: Sequence[float]
) -> bool:
    """True when these masks include the one the plots show."""
    return plot is not None and (plot.scorer, plot.pattern) == (scorer, pattern) and (
        plot.sparsity in sparsities
    )


def dense_values(
    context: LoadContext,
    load: sweep_plan.Load,
    settings: ml_collections.ConfigDict,
    dense: Pruned,
) -> dict[str, Measured]:
    """The dense metric of every task of the load (`dense`: the unpruned level): stored, or
    evaluated (per seed of a fine-tune task) when the plan says."""
    prepared = context.prepared
    values = {}
    for name in load.tasks:
        if name in load.dense:
            label = f"{prepared.key}/{name} dense"
            context.bar.set_description(label)
            values[name] = measure(
                context,
                f"{prepared.key}|{name}|dense",
                label,
                lambda seed, name=name: prepared.value(name, dense, seed),
            )
        else:
            runs = context.store.runs
            record = sweep_plan.stored_dense(runs, prepared.key, settings, name, context.stamp)
            values[name] = stored_measured(record)
    return values


def stored_measured(record: dict) -> Measured:
    """The dense Measured a stored run record holds."""
    if "dense_std" not in record:
        return Measured(record["dense"])
    return Measured(
        record["dense"],
        tuple(record["seeds"]),
        tuple(record["dense_values"]),
        record["dense_std"],
    )


def open_records(
    context: LoadContext, curve: sweep_plan.Curve, scores_seconds: float
) -> dict[str, dict]:
    """The run records of one curve for every task, with dense, level 0 and the seconds the
    curve's scores took (0 for the sequential methods, which share no work across levels)."""
    records = {}
    for name, evaluator in context.prepared.evaluators.items():
        record = context.store.run(
            context.prepared.key, task_registry.get(name), curve.pattern, curve.scorer,
            context.stamp,
        )
        dense = context.dense[name]
        record["dense"] = dense.value
        if dense.seeds:
            record["seeds"] = list(dense.seeds)
            record["dense_values"] = list(dense.values)
            record["dense_std"] = dense.std
        record["num_examples"] = evaluator.num_examples
        record["scores_seconds"] = scores_seconds
        if 0.0 in context.config.grid and level_of(record, 0.0) is None:
            record["levels"].append(level_record(0.0, context.dense_sparsity, dense))
        records[name] = record
    context.store.save()
    return records


def checkpoint_name(settings: ml_collections.ConfigDict) -> str:
    """What a model entry loads: its `name`, "checkpoint:RUN_DIR@STEP" (the step resolved) for a
    pre-training run's checkpoint, or "tiny <model_type>" for a random tiny model."""
    if len(settings.tiny):
        return f"tiny {settings.tiny.model_type}"
    source = checkpoint_source(settings)
    return settings.name if source is None else CHECKPOINT_PREFIX + source


def evaluate_level(
    context: LoadContext,
    records: dict[str, dict],
    label: str,
    level: sweep_plan.Level,
    pruned: Pruned,
) -> None:
    """Evaluates the tasks that lack this level (per seed of a fine-tune task); saves after
    each."""
    prepared = context.prepared
    sparsity = measured(pruned, prepared.mesh)
    for name in level.tasks:
        context.bar.set_description(f"{prepared.key}/{name} {label} {level.sparsity:.2f}")
        value = measure(
            context,
            f"{records[name]['id']}|{level.sparsity!r}",
            f"{prepared.key}/{name} at {level.sparsity:g} sparsity",
            lambda seed, name=name: prepared.value(name, pruned, seed),
        )
        record = level_record(level.sparsity, sparsity, value)
        record["prune_seconds"] = pruned.seconds
        records[name]["levels"].append(record)
        context.store.save()


def finite(value: float, label: str) -> float:
    """The value as a float; ValueError naming where it came from when it is not finite."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(
            f"{label}: the metric is {value}, not a finite number; nothing was stored for it. "
            "Check the task's data (enough examples for its metric) and the model's weights."
        )
    return value


def level_record(
    sparsity: float, measured_sparsity: tuple[float, float], value: Measured
) -> dict:
    """One level of a run: the asked sparsity, the measured target and model sparsity, value;
    fine-tuned over seeds also the seeds, their values and standard deviation."""
    record = {
        "sparsity": sparsity,
        "measured_sparsity": measured_sparsity[0],
        "model_sparsity": measured_sparsity[1],
        "value": value.value,
    }
    if value.seeds:
        record.update(seeds=list(value.seeds), values=list(value.values), std=value.std)
    return record


def measured(pruned: Pruned, mesh: Mesh | None) -> tuple[float, float]:
    """Sparsity of the target set and of the whole model at this level: the zeros
    `pruning.report` counts on the pruned parameters (the weights the level prunes and those
    already 0), counted without pruning them."""
    params, _ = jax.tree_util.tree_flatten(pruned.params)
    levels, _ = jax.tree_util.tree_flatten(pruned.levels, is_leaf=lambda x: x is None)
    zeros = [int(z) for z in np.asarray(zero_counts(mesh)(params, levels, np.int32(pruned.index)))]
    sizes = [int(np.prod(p.shape, dtype=np.int64)) for p in params]
    targets = [i for i, lv in enumerate(levels) if lv is not None]
    target_size = sum(sizes[i] for i in targets)
    target = sum(zeros[i] for i in targets) / target_size if target_size else 0.0
    return target, sum(zeros) / sum(sizes)


@functools.cache
def zero_counts(mesh: Mesh | None) -> Callable[[list, list, Any], jax.Array]:
    """A jitted (parameter leaves, their levels leaves (None off target), level index) ->
    int32 count per leaf of the weights that are 0 at that level (levels value <= index, or the
    weight itself 0), replicated on the mesh so every host reads them."""

    def counts(params: list, levels: list, index: jax.Array) -> jax.Array:
        return jnp.stack([
            jnp.sum((p == 0) if lv is None else (p == 0) | (lv <= index), dtype=jnp.int32)
            for p, lv in zip(params, levels, strict=True)
        ])

    return jax.jit(counts, out_shardings=None if mesh is None else mesh_lib.replicated(mesh))


def mask_plot(settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> MaskPlot:
    """Which mask a model's plots show (see MaskPlot)."""
    unstructured = [p for p in map(parse_pattern, settings.patterns) if not p.is_n_of_m]
    levels = [s for s in config.grid if s > 0.0] or [config.plot_sparsity]
    sparsity = min(levels, key=lambda s: abs(s - config.plot_sparsity))
    pattern = unstructured[0] if unstructured else Pattern("layerwise")
    return MaskPlot(settings.scorers[0], pattern, sparsity)


def plot_masks(prepared: ModelRun, mask: Any, plot: MaskPlot, workdir: Path) -> list[Path]:
    """Per-layer sparsity and the component view (the paper's Figure 1) of one mask."""
    from es_jax import models
    from es_jax.analysis import plots

    title = (
        f"{prepared.key}: {plot.pattern.name} {plot.scorer} mask at "
        f"{100 * plot.sparsity:g}% sparsity"
    )
    family = models.family_of(prepared.model)
    return plots.plot_mask(prepared.params, mask, family, workdir, prepared.key, title)
