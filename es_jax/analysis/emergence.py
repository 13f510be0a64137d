"""Emergence of sparsity across a pre-training run's checkpoints (the paper's section 5, Fig. 8(i)).

`es-jax emergence --workdir DIR` streams over the checkpoints of one run (DIR holds `checkpoints/`)
or of several runs (DIR's sub-directories, e.g. one per data volume), holding one checkpoint's
parameters and two sets of masks at a time, whatever the number of checkpoints. Per step it records
over the target set and the whole model: exact zeros; the fraction of |w| below absolute thresholds
and below multiples of each matrix's std; per-layer and per-component breakdowns; and the OMP masks
at a few sparsities with their overlap (IoU, cosine, chance) with the previous and the final
checkpoint's masks. It then locates the abrupt transition of each near-zero curve and writes
`emergence.json` (a list `steps`) and PNG plots.

The analysis reads checkpoints through readers it is handed (`Checkpoints`: a run's directory,
steps, config and a params reader); `es_jax.train.checkpointing.find_runs` and `open_run` make them.
A checkpoint its reader cannot read (an OSError: files missing, cut short, or not matching their
checksums) is skipped with a warning naming it, and the newest readable one is the run's final
checkpoint. Parameters holding NaN or inf (a diverged run) are refused, naming the run and step.

With a device mesh (`mesh=`, `es_jax.mesh`), each checkpoint's parameters are placed on it with
`mesh.shard` (FSDP-sharded or replicated by the shared rule) and its masks and figures computed
there, the masks kept sharded like the parameters; every host computes, and only host 0 writes
files. The figures are those of the analysis on one device.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from es_jax import pruning
from es_jax.mesh import shard

THRESHOLDS = (1e-4, 1e-3, 1e-2)
RELATIVE_THRESHOLDS = (0.01, 0.05, 0.1)
SPARSITIES = (0.2, 0.5, 0.8)
RESULTS_FILE = "emergence.json"


# ----------------------------------------------------------------------------- checkpoints


class Checkpoints(Protocol):
    """One run's checkpoints as the analysis reads them (`checkpointing.open_run` gives one)."""

    @property
    def directory(self) -> Path:
        """The run's directory: its emergence.json is written there."""

    @property
    def steps(self) -> Sequence[int]:
        """The saved steps, ascending (at least one)."""

    @property
    def config(self) -> dict[str, Any]:
        """The run's stored config ({} if none), for its label."""

    def read_params(self, step: int) -> Any:
        """The parameters saved at `step`, as host arrays; an OSError naming the checkpoint if it
        cannot be read as saved."""


def run_label(run_dir: Path, config: dict[str, Any]) -> str:
    """A run's name for plots: its data volume when its config says, else its directory name."""
    fraction = config.get("data", {}).get("fraction")
    if fraction is not None:
        return f"{Path(run_dir).name} (data {float(fraction):.0%})"
    return Path(run_dir).name


def readable_params(run: Checkpoints, step: int) -> Any | None:
    """The finite parameters saved at `step`, or None, with a warning, if they cannot be read."""
    try:
        params = run.read_params(step)
    except OSError as error:
        warnings.warn(f"{error}; skipping it.", stacklevel=2)
        return None
    refuse_non_finite(params, run.directory, step)
    return params


def refuse_non_finite(params: Any, run_dir: Path, step: int) -> None:
    """Refuses parameters holding NaN or inf, naming the run, the step and the arrays."""
    leaves = jax.tree.leaves(params)
    bad = [path for path, leaf in zip(pruning.leaf_paths(params), leaves, strict=True)
           if not np.isfinite(np.asarray(leaf)).all()]
    if bad:
        raise ValueError(
            f"Run {run_dir}, step {step}: {len(bad)} of {len(leaves)} parameter arrays hold NaN or "
            f"inf (first: {bad[0]}); the run diverged, and near-zero fractions or masks of such "
            "weights mean nothing. Pre-train it again (pre-training now stops where it diverges) "
            "or leave it out of --workdir."
        )


def newest_readable(run: Checkpoints) -> tuple[int, Any]:
    """The newest step whose parameters can be read, and those parameters."""
    for step in reversed(list(run.steps)):
        params = readable_params(run, step)
        if params is not None:
            return step, params
    raise ValueError(
        f"None of the {len(run.steps)} checkpoints of run {run.directory} can be read (see the "
        "warnings above); pre-train it again or leave it out of --workdir."
    )


# ----------------------------------------------------------------------------- per step


def grouped(per_leaf: dict[str, list[float]], sizes: dict[str, int],
            group: Callable[[str], str]) -> dict[str, list[float]]:
    """Size-weighted fractions of the leaves that fall in each group."""
    totals: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for path, fractions in per_leaf.items():
        key = group(path)
        totals[key] = totals.get(key, 0.0) + np.asarray(fractions) * sizes[path]
        counts[key] = counts.get(key, 0) + sizes[path]
    return {key: (totals[key] / counts[key]).tolist() for key in sorted(totals, key=_natural)}


def _natural(key: str) -> tuple:
    """Sort key that puts "10" after "9"."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key))


def omp_masks(params: Any, where: str, sparsities: Sequence[float]) -> list[Any]:
    """Nested global magnitude (OMP) masks of the target set at each sparsity."""
    return pruning.unstructured(pruning.magnitude(params, where=where), list(sparsities))


def target_sizes(params: Any, where: str) -> dict[str, int]:
    """Number of weights in each target leaf, by path."""
    selected = pruning.select(where)
    return {
        path: int(np.size(leaf))
        for path, leaf in zip(pruning.leaf_paths(params), jax.tree.leaves(params), strict=True)
        if selected(path, leaf)
    }


def weight_figures(
    params: Any, where: str, thresholds: Sequence[float], relative_thresholds: Sequence[float]
) -> dict[str, Any]:
    """Exact-zero and near-zero fractions over the target set, the model and each target leaf.

    Jit-able: one compile serves every checkpoint of a run.
    """
    zeros = pruning.report(params, where=where)
    absolute = pruning.near_zero(params, list(thresholds), where=where)
    relative = pruning.near_zero(params, list(relative_thresholds), where=where, relative=True)

    def numbers(near: dict[str, Any]) -> dict[str, Any]:
        return {k: near[k] for k in ("target", "model", "leaves")}

    return {
        "exact_zeros": {
            "target": zeros["target"]["sparsity"],
            "model": zeros["model"]["sparsity"],
            "leaves": {p: [zeros["leaves"][p]["sparsity"]] for p in absolute["leaves"]},
        },
        "near_zero": numbers(absolute),
        "near_zero_relative": numbers(relative),
    }


def overlaps(masks: list[Any], references: list[Any]) -> list[dict[str, float]]:
    """IoU and cosine of each mask with its reference, and their chance values."""
    keys = ("iou", "cosine", "chance_iou", "chance_cosine")
    return [
        {k: float(v) for k, v in pruning.similarity(mask, reference).items() if k in keys}
        for mask, reference in zip(masks, references, strict=True)
    ]


def step_record(step: int, figures: dict[str, Any], sizes: dict[str, int], family: Any,
                sparsities: Sequence[float], previous: list | None, final: list) -> dict[str, Any]:
    """One checkpoint's JSON record from its figures, with per-component and per-layer totals
    (what a path's component and layer are, the model's family says)."""

    def breakdown(group: Callable[[str], str]) -> dict[str, dict[str, list[float]]]:
        parts = {kind: grouped(figures[kind]["leaves"], sizes, group)
                 for kind in ("exact_zeros", "near_zero", "near_zero_relative")}
        return {name: {kind: values[name] for kind, values in parts.items()}
                for name in parts["near_zero"]}

    return {
        "step": step,
        **{kind: {"target": figures[kind]["target"], "model": figures[kind]["model"]}
           for kind in ("exact_zeros", "near_zero", "near_zero_relative")},
        "components": breakdown(family.component_of),
        "layers": breakdown(partial(layer_name, family)),
        "masks": [
            {"sparsity": sparsity, "previous": None if previous is None else previous[i],
             "final": final[i]}
            for i, sparsity in enumerate(sparsities)
        ],
    }


def layer_name(family: Any, path: str) -> str:
    """The block index of a path as a string ("11"), or "other" outside the blocks."""
    layer = family.layer_of(path)
    return "other" if layer is None else str(layer)


def _to_python(tree: Any) -> Any:
    """Device scalars and lists of them as Python floats."""
    return jax.tree.map(lambda x: float(x) if np.ndim(x) == 0 else x, jax.device_get(tree))


# ----------------------------------------------------------------------------- transitions


def largest_jump(steps: Sequence[int], values: Sequence[float]) -> dict[str, float] | None:
    """The biggest rise of a curve between two consecutive checkpoints."""
    if len(steps) < 2:
        return None
    rises = np.diff(np.asarray(values, np.float64))
    i = int(np.argmax(rises))
    return {"from_step": int(steps[i]), "to_step": int(steps[i + 1]), "rise": float(rises[i])}


def change_point(steps: Sequence[int], values: Sequence[float]) -> dict[str, float] | None:
    """The step where a continuous two-piece linear fit of the curve bends (least squares)."""
    x, y = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    if len(x) < 4:
        return None
    best = None
    for knot in x[1:-1]:
        design = np.stack([np.ones_like(x), x, np.maximum(x - knot, 0.0)], axis=1)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        error = float(np.sum((design @ coef - y) ** 2))
        if best is None or error < best[0]:
            best = (error, knot, coef)
    error, knot, coef = best
    return {
        "step": int(knot),
        "slope_before": float(coef[1]),
        "slope_after": float(coef[1] + coef[2]),
        "residual": error,
    }


def transitions(records: list[dict[str, Any]], thresholds: Sequence[float],
                relative_thresholds: Sequence[float]) -> dict[str, Any]:
    """Largest jump and change point of every near-zero curve over the target set."""
    steps = [r["step"] for r in records]
    found = {}
    for kind, levels in (("near_zero", thresholds), ("near_zero_relative", relative_thresholds)):
        for i, threshold in enumerate(levels):
            curve = [r[kind]["target"][i] for r in records]
            found[f"{kind}@{threshold:g}"] = {
                "largest_jump": largest_jump(steps, curve),
                "change_point": change_point(steps, curve),
            }
    return found


# ----------------------------------------------------------------------------- runs


def settings(where: str, thresholds: Sequence[float], relative_thresholds: Sequence[float],
             sparsities: Sequence[float]) -> dict[str, Any]:
    """The analysis settings, stored with the results so a re-run can reuse them."""
    return {
        "where": where,
        "thresholds": list(thresholds),
        "relative_thresholds": list(relative_thresholds),
        "sparsities": list(sparsities),
    }


def analyse_run(
    run: Checkpoints,
    where: str | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    relative_thresholds: Sequence[float] = RELATIVE_THRESHOLDS,
    sparsities: Sequence[float] = SPARSITIES,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Figures for every readable checkpoint of one run; reuses its emergence.json if nothing
    changed (a run with skipped checkpoints is analysed again, and warned about, every time).

    The model family is recognised from the parameters' paths; `where` defaults to its target set.
    With a `mesh`, each checkpoint's parameters and masks are sharded over it (`held`).
    """
    from es_jax import models

    run_dir, steps = Path(run.directory), list(run.steps)
    final_step, last = newest_readable(run)
    family = models.family_of_paths(pruning.leaf_paths(last))
    where = family.PRUNABLE if where is None else where
    wanted = settings(where, thresholds, relative_thresholds, sparsities)
    cached = _cached(run_dir, steps, wanted)
    if cached is not None:
        return cached
    masks_of = jax.jit(partial(omp_masks, where=where, sparsities=sparsities))
    figures_of = jax.jit(partial(weight_figures, where=where, thresholds=thresholds,
                                 relative_thresholds=relative_thresholds))
    final_masks = held(masks_of(placed(last, mesh)), mesh)
    sizes = target_sizes(last, where)
    del last
    records, previous_masks = [], None
    up_to_final = [step for step in steps if step <= final_step]
    shown = progress and jax.process_index() == 0
    for step in _maybe_progress(up_to_final, shown, run_dir.name):
        params = readable_params(run, step)
        if params is None:
            continue
        params = placed(params, mesh)
        masks = held(masks_of(params), mesh)
        figures = _to_python(figures_of(params))
        previous = None if previous_masks is None else overlaps(masks, previous_masks)
        records.append(step_record(step, figures, sizes, family, sparsities, previous,
                                   overlaps(masks, final_masks)))
        previous_masks, params = masks, None
    result = {
        "run": str(run_dir),
        "label": run_label(run_dir, run.config),
        "settings": wanted,
        "steps": records,
        "skipped_steps": sorted(set(steps) - {record["step"] for record in records}),
        "transitions": transitions(records, thresholds, relative_thresholds),
    }
    if jax.process_index() == 0:
        (run_dir / RESULTS_FILE).write_text(json.dumps(result, indent=1))
    return result


def placed(params: Any, mesh: Mesh | None) -> Any:
    """Host parameters sharded over `mesh` by the shared rule (`mesh.shard`); as they are
    without a mesh."""
    return params if mesh is None else shard(params, mesh)


def held(masks: list[Any], mesh: Mesh | None) -> list[Any]:
    """Masks as the analysis keeps them between checkpoints: host arrays without a mesh, sharded
    like the parameters on one (no host can gather a mask that spans several hosts)."""
    return jax.device_get(masks) if mesh is None else shard(masks, mesh)


def _cached(run_dir: Path, steps: list[int], wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The stored analysis of a run if it covers exactly these checkpoints and settings."""
    path = run_dir / RESULTS_FILE
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    if stored.get("settings") != wanted or [r["step"] for r in stored["steps"]] != steps:
        return None
    return stored


def _maybe_progress(steps: list[int], enabled: bool, name: str):
    """The steps, wrapped in a progress bar when asked."""
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=f"emergence {name}", unit="ckpt")


def compare_runs(results: list[dict[str, Any]], headline: str) -> list[dict[str, Any]]:
    """One row per run: final near-zero fraction and where its headline curve jumps and bends."""
    rows = []
    for result in results:
        found = result["transitions"][headline]
        kind, _, threshold = headline.partition("@")
        levels = result["settings"]["thresholds" if kind == "near_zero" else "relative_thresholds"]
        index = [f"{t:g}" for t in levels].index(threshold)
        rows.append({
            "run": result["label"],
            "final_step": result["steps"][-1]["step"],
            "final_near_zero": result["steps"][-1][kind]["target"][index],
            "largest_jump": found["largest_jump"],
            "change_point": found["change_point"],
        })
    return rows


def emergence(
    workdir: str | Path,
    runs: Sequence[Checkpoints],
    where: str | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    relative_thresholds: Sequence[float] = RELATIVE_THRESHOLDS,
    sparsities: Sequence[float] = SPARSITIES,
    headline: str | None = None,
    plots: bool = True,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Analyses `runs` (workdir's own, or its sub-directories') on `mesh` (one device if None);
    writes emergence.json and plots (host 0)."""
    workdir = Path(workdir)
    results = [
        analyse_run(run, where, thresholds, relative_thresholds, sparsities, progress, mesh)
        for run in runs
    ]
    headline = headline or f"near_zero@{thresholds[len(thresholds) // 2]:g}"
    if headline not in results[0]["transitions"]:
        raise ValueError(
            f"headline {headline!r} is none of the curves {sorted(results[0]['transitions'])}."
        )
    single = [Path(run.directory) for run in runs] == [workdir]
    report = results[0] if single else {"runs": results}
    report = {**report, "headline": headline, "comparison": compare_runs(results, headline)}
    if jax.process_index() != 0:
        return report
    (workdir / RESULTS_FILE).write_text(json.dumps(report, indent=1))
    if plots:
        from es_jax.analysis import emergence_plots

        emergence_plots.plot_all(results, headline, workdir)
    return report
