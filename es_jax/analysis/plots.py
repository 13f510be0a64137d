"""Sweep figures: drop against sparsity per task, per-layer sparsity, and where pruned weights sit.

All functions take plain data (the `runs` of a results.json, `{path: value}` dicts, numpy masks,
a training log's path, or a parameter pytree and its mask), write PNGs and return their paths.
matplotlib runs headless (Agg).
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from etils import epath

if TYPE_CHECKING:
    from es_jax.models import Family



def panel_grid(count: int, columns: int) -> tuple[int, int]:
    """Rows and columns of a subplot grid for `count` panels."""
    columns = max(1, min(columns, count))
    return math.ceil(count / columns), columns


def plot_drops(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> epath.Path:
    """One panel per (checkpoint, task): drop vs sparsity per (pattern, scorer), essential marked.

    Runs of model entries that load the same checkpoint share a panel (their curves are labelled
    with the entry), so methods that need entries of their own are compared in one place. The
    y-axis is the drop in the metric's units (positive = worse than dense); the dashed line is
    the tolerance epsilon, and a dotted vertical line of the curve's colour marks its essential
    sparsity. A run fine-tuned over seeds has error bars of its seed spread at every level
    (sqrt(std_dense^2 + std_level^2), the `noise` its drops are judged against). Perplexity drops
    use a symmetric log scale, as they explode past the knee.
    """
    panels: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for run in runs:
        panels.setdefault((run.get("checkpoint", run["model"]), run["task"]), []).append(run)
    rows, columns = panel_grid(len(panels), 3)
    crowded = max(len(panel) for panel in panels.values()) > 5
    width, height = (7.0, 5.0) if crowded else (4.6, 3.6)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows),
                                squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, ((model, task), panel_runs) in zip(axes.flat, panels.items(), strict=False):
        entries = len({run["model"] for run in panel_runs})
        for run in panel_runs:
            levels = sorted(run["levels"], key=lambda level: level["sparsity"])
            x = [100 * level["sparsity"] for level in levels]
            y = [level["drop"] for level in levels]
            label = f"{run['pattern']}/{run['scorer']}"
            if entries > 1:
                label = f"{run['model']}: {label}"
            # Fine-tuned over seeds: bars of the seed spread a drop must exceed (finalise's noise)
            spread = [level["noise"] for level in levels] if "dense_std" in run else None
            if ":" in run["pattern"]:  # N:M: one pruned level, a point rather than a line
                x, y = x[1:], y[1:]
                spread = spread[1:] if spread else None
                line = ax.errorbar(x, y, yerr=spread, marker="s", ms=5, ls="none", capsize=2,
                                   label=label).lines[0]
            else:
                line = ax.errorbar(x, y, yerr=spread, marker="o", ms=3, capsize=2,
                                   label=label).lines[0]
            if run.get("essential_sparsity") is not None:
                ax.axvline(100 * run["essential_sparsity"], color=line.get_color(), ls=":")
        tolerance = panel_runs[0].get("tolerance")
        if tolerance is not None:
            ax.axhline(tolerance, color="grey", ls="--", lw=1, label="epsilon")
        ax.axhline(0.0, color="black", lw=0.5)
        if not panel_runs[0]["higher_is_better"]:
            lowest = min(level["drop"] for run in panel_runs for level in run["levels"])
            ax.set_yscale("symlog", linthresh=max(tolerance or 1.0, 1e-3))
            ax.set_ylim(bottom=min(lowest, 0.0))
        # Checkpoint sources ("checkpoint:RUN_DIR@STEP") are long: wrapped, not cut off.
        ax.set_title(textwrap.fill(f"{model} / {task}", 48), fontsize=9)
        ax.set_xlabel("sparsity of the target weights (%)")
        ax.set_ylabel(f"drop in {panel_runs[0]['metric']} (worse >)")
        ax.legend(fontsize=7 if len(panel_runs) < 6 else 6, loc="upper left")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_layer_sparsity(
    leaf_sparsity: Mapping[str, float], family: Family, path: str | os.PathLike, title: str = ""
) -> epath.Path:
    """Bars of each target matrix's sparsity, grouped by block and coloured by component (the
    model's family reads a path's block and component)."""
    layer_of, component_of = family.layer_of, family.component_of
    components = sorted({component_of(p) for p in leaf_sparsity})
    colours = plt.get_cmap("tab10")
    figure, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(leaf_sparsity) + 2), 3.8))
    for i, (leaf, sparsity) in enumerate(leaf_sparsity.items()):
        ax.bar(i, 100 * sparsity, color=colours(components.index(component_of(leaf)) % 10))
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(i % 10)) for i in range(len(components))]
    ax.legend(handles, components, fontsize=7, ncols=min(4, len(components)))
    layers = [layer_of(p) for p in leaf_sparsity]
    starts = [i for i, layer in enumerate(layers) if i == 0 or layer != layers[i - 1]]
    ax.set_xticks(starts, [str(layers[i]) for i in starts], fontsize=7)
    ax.set_xlabel("block (matrices in order)")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_mask(
    params: Any, mask: Any, family: Family, directory: str | os.PathLike, name: str, title: str
) -> list[epath.Path]:
    """`layers_NAME.png` (each target matrix's sparsity) and `components_NAME.png` (the paper's
    Figure 1 view) of one mask over the parameters of a model of `family`, its target set."""
    import jax

    from es_jax import pruning

    directory = epath.Path(directory)
    report = pruning.report(pruning.apply(params, mask), where=family.PRUNABLE)
    leaf_sparsity = {
        path: float(leaf["sparsity"]) for path, leaf in report["leaves"].items() if leaf["target"]
    }
    component_masks = {
        path: np.asarray(leaf)
        for path, leaf in zip(pruning.leaf_paths(mask), jax.tree.leaves(mask), strict=True)
    }
    return [
        plot_layer_sparsity(leaf_sparsity, family, directory / f"layers_{name}.png", title),
        plot_component_masks(
            component_masks, family, directory / f"components_{name}.png", title
        ),
    ]


def pruned_density(mask: np.ndarray, max_pixels: int = 192) -> np.ndarray:
    """Fraction of pruned weights in blocks of a 2-D keep-mask, at most `max_pixels` a side."""
    pruned = ~np.asarray(mask, dtype=bool)
    rows, cols = pruned.shape
    step_r, step_c = math.ceil(rows / max_pixels), math.ceil(cols / max_pixels)
    padded = np.zeros((math.ceil(rows / step_r) * step_r, math.ceil(cols / step_c) * step_c))
    counts = np.zeros_like(padded)
    padded[:rows, :cols] = pruned
    counts[:rows, :cols] = 1
    shape = (padded.shape[0] // step_r, step_r, padded.shape[1] // step_c, step_c)
    return padded.reshape(shape).sum((1, 3)) / np.maximum(counts.reshape(shape).sum((1, 3)), 1)


def plot_component_masks(
    masks: Mapping[str, np.ndarray],
    family: Family,
    path: str | os.PathLike,
    title: str = "",
    max_layers: int = 6,
) -> epath.Path:
    """The paper's Figure 1 view: each component's keep-mask, pruned weights bright.

    Rows are blocks (at most `max_layers`, evenly spaced), columns are components (q, k, v, out,
    FFN ...); each panel is the (in, out) matrix, pruned weights yellow, with block averaging for
    large matrices. Panel titles give the component's pruned percentage.
    """
    layer_of, component_of = family.layer_of, family.component_of
    layers = sorted({layer_of(p) for p in masks if layer_of(p) is not None})
    if len(layers) > max_layers:
        picks = np.linspace(0, len(layers) - 1, max_layers).round().astype(int)
        layers = [layers[i] for i in sorted(set(picks))]
    components = list(dict.fromkeys(component_of(p) for p in masks))
    by_key = {(layer_of(p), component_of(p)): m for p, m in masks.items()}
    figure, axes = plt.subplots(
        len(layers),
        len(components),
        figsize=(2.0 * len(components), 1.9 * len(layers) + 0.6),
        squeeze=False,
    )
    for r, layer in enumerate(layers):
        for c, component in enumerate(components):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            mask = by_key.get((layer, component))
            if mask is None:
                ax.set_visible(False)
                continue
            ax.imshow(pruned_density(mask), cmap="viridis", vmin=0, vmax=1, aspect="auto")
            pruned = 100 * (1 - np.mean(mask))
            ax.set_title(f"{component}\n{pruned:.1f}% pruned", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"block {layer}", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_training_loss(
    log_path: str | os.PathLike, path: str | os.PathLike, title: str = ""
) -> epath.Path | None:
    """The training loss against step, from a run's `train_log.jsonl`; None if nothing is logged.

    A step logged twice (a run resumed from before it) is drawn with its last record.
    """
    records = training_records(log_path)
    if not records:
        return None
    figure, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("MLM loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path)


def training_records(log_path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines training log by step, the last of each step; [] if absent.

    A line that is not a complete JSON record (its write was cut short by a kill, and later
    records were appended on the lines after it) is skipped with a warning naming it.
    """
    log_path = epath.Path(log_path)
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    by_step = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{log_path}, line {number}: not a complete JSON record (a write cut "
                          "short by a kill?); skipped it.", stacklevel=2)
            continue
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def save_figure(figure: plt.Figure, path: str | os.PathLike) -> epath.Path:
    """Writes the figure as PNG (a local path or a bucket URL, through etils.epath) and closes
    it; on a multi-host run host 0 alone writes (every host draws the same figure)."""
    import jax

    path = epath.Path(path)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as file:
            figure.savefig(file, format="png", dpi=110)
    plt.close(figure)
    return path
