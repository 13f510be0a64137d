"""What a sweep still has to do: a pure function of the config and the runs results.json holds.

`plan(config, runs)` lists the model loads with work left, in config order. A load is one model
loaded once for a group of tasks (all zero-shot tasks of a model share a load; each fine-tune
task has its own); it names the tasks whose dense value no stored run holds and, per (scorer,
pattern) curve, the levels some task still lacks. Refinement levels (between the essential
sparsity and the next grid level) depend on the values of the grid levels, so a curve plans its
grid levels first and its refinement levels once every grid level is stored: the executor asks
`missing_levels` again after evaluating a curve's levels. A stored run counts only while its
fingerprint (what changes a value) matches the config. Resuming a killed sweep is running this
plan again; nothing else decides what is left. A fine-tune entry's levels are each fine-tuned
once per seed (`Load.seeds`); the seeds of an unfinished level that a crash left stored are the
executor's to skip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections

from es_jax.analysis import essential
from es_jax.commands.sweep_config import Pattern, parse_pattern, run_seeds
from es_jax.commands.sweep_results import finalise, fingerprint, level_of, run_id
from es_jax.evaluate import tasks as task_registry


class Level(NamedTuple):
    """A sparsity to evaluate and the tasks that still lack it."""

    sparsity: float
    tasks: tuple[str, ...]


class Curve(NamedTuple):
    """One (scorer, pattern) of a load with work left: its levels to evaluate (maybe none, when
    only its records are missing)."""

    scorer: str
    pattern: str
    levels: tuple[Level, ...]


class Load(NamedTuple):
    """One model loaded once for a group of tasks, with everything left to do on it."""

    model: str  # the key of config.models
    tasks: tuple[str, ...]  # the tasks evaluated on this load
    dense: tuple[str, ...]  # tasks whose dense value must be evaluated
    curves: tuple[Curve, ...]  # curves with work left, in (scorer, pattern) config order
    plots: bool  # the model's first load: it draws the mask plots
    seeds: tuple[int, ...] = ()  # fine-tune: each level is fine-tuned once a seed; () zero-shot


def plan(config: ml_collections.ConfigDict, runs: Mapping[str, dict]) -> list[Load]:
    """The loads with work left, in config order; empty when the sweep is complete."""
    loads = []
    for key, settings in config.models.items():
        stamp = fingerprint(key, settings, config)
        for index, tasks in enumerate(task_groups(settings)):
            curves = tuple(
                curve
                for scorer in settings.scorers
                for pattern in settings.patterns
                if (curve := curve_left(config, runs, key, stamp, tasks, scorer, pattern))
            )
            if curves:
                stored = {t: stored_dense(runs, key, settings, t, stamp) for t in tasks}
                dense = tuple(t for t in tasks if stored[t] is None)
                finetune = task_registry.get(tasks[0]).protocol == "finetune"
                seeds = run_seeds(settings, config) if finetune else ()
                loads.append(Load(key, tasks, dense, curves, plots=index == 0, seeds=seeds))
    return loads


def run_ids(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(model key, run id) of every run of the config, in config order."""
    return [
        (key, run_id(key, task, pattern, scorer))
        for key, settings in config.models.items()
        for task in settings.tasks
        for pattern in settings.patterns
        for scorer in settings.scorers
    ]


def stale_runs(config: ml_collections.ConfigDict, runs: Mapping[str, dict]) -> list[str]:
    """The ids of stored runs of the config whose fingerprint differs: computed with other
    settings, so the plan would compute them again."""
    stamps = {key: fingerprint(key, settings, config) for key, settings in config.models.items()}
    return [
        rid
        for key, rid in run_ids(config)
        if rid in runs and current(runs, rid, stamps[key]) is None
    ]


def evaluations(loads: Sequence[Load]) -> int:
    """How many evaluations the loads hold: dense values plus (level, task) pairs, each once a
    seed of a fine-tune load."""
    return sum(
        max(1, len(load.seeds))
        * (len(load.dense) + sum(len(lv.tasks) for curve in load.curves for lv in curve.levels))
        for load in loads
    )


def task_groups(settings: ml_collections.ConfigDict) -> list[tuple[str, ...]]:
    """The tasks of each load: all tasks at once when zero-shot, one fine-tune task a load."""
    if task_registry.get(settings.tasks[0]).protocol == "zero_shot":
        return [tuple(settings.tasks)]
    return [(task,) for task in settings.tasks]


def curve_left(
    config: ml_collections.ConfigDict,
    runs: Mapping[str, dict],
    key: str,
    stamp: str,
    tasks: Sequence[str],
    scorer: str,
    pattern: str,
) -> Curve | None:
    """The work left on one curve of a load, or None when every task's run is complete."""
    records = {task: current(runs, run_id(key, task, pattern, scorer), stamp) for task in tasks}
    levels = missing_levels(config, records, parse_pattern(pattern))
    if not levels and all(r is not None and r["dense"] is not None for r in records.values()):
        return None
    return Curve(scorer, pattern, levels)


def current(runs: Mapping[str, dict], rid: str, stamp: str) -> dict | None:
    """The stored run of this id if its fingerprint matches, else None (it will be redone)."""
    record = runs.get(rid)
    return record if record is not None and record.get("fingerprint") == stamp else None


def missing_levels(
    config: ml_collections.ConfigDict, records: Mapping[str, dict | None], pattern: Pattern
) -> tuple[Level, ...]:
    """The levels some task lacks: grid levels first; refinement levels once the grid is done."""
    grid = pattern_levels(pattern, config.grid)
    levels = lacking(records, grid)
    if levels:
        return levels
    refine = sorted({s for r in records.values() for s in refinement_of(r, pattern, config)})
    return lacking(records, refine)


def lacking(records: Mapping[str, dict | None], sparsities: Sequence[float]) -> tuple[Level, ...]:
    """(sparsity, tasks without it) for each sparsity some task's record (or no record) lacks."""
    levels = []
    for sparsity in sparsities:
        tasks = tuple(
            task for task, r in records.items() if r is None or level_of(r, sparsity) is None
        )
        if tasks:
            levels.append(Level(sparsity, tasks))
    return tuple(levels)


def pattern_levels(pattern: Pattern, grid: Sequence[float]) -> list[float]:
    """The pruned levels of a pattern: the grid's non-zero sparsities, or 1 - N/M."""
    if pattern.is_n_of_m:
        return [round(1.0 - pattern.n / pattern.m, 6)]
    return [s for s in grid if s > 0.0]


def refinement_of(record: dict | None, pattern: Pattern, config: Any) -> list[float]:
    """The refinement levels a run asks for, from its grid levels (none for N:M or no run)."""
    if not config.refine or pattern.is_n_of_m or record is None or record["dense"] is None:
        return []
    coarse = {
        **record,
        "levels": [dict(lv) for lv in record["levels"] if lv["sparsity"] in config.grid],
    }
    found = finalise(coarse, config.epsilon)["essential_sparsity"]
    return essential.refinement_levels(config.grid, found, config.refine)


def stored_dense(
    runs: Mapping[str, dict], key: str, settings: Any, task: str, stamp: str
) -> dict | None:
    """A current stored run of (model, task) that holds its dense value (and, fine-tuned over
    seeds, the seeds' dense values), if one does."""
    for pattern in settings.patterns:
        for scorer in settings.scorers:
            record = current(runs, run_id(key, task, pattern, scorer), stamp)
            if record is not None and record["dense"] is not None:
                return record
    return None
