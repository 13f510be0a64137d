"""Plots of sparsity emerging during pre-training: near-zero fraction, mask overlap, components."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _curve_index(result: dict[str, Any], headline: str) -> tuple[str, int, str]:
    """(record key, threshold index, axis label) of a curve name like `near_zero@0.001`."""
    kind, _, threshold = headline.partition("@")
    levels = result["settings"]["thresholds" if kind == "near_zero" else "relative_thresholds"]
    index = [f"{t:g}" for t in levels].index(threshold)
    label = f"|w| < {threshold}" + (" x std of its matrix" if kind == "near_zero_relative" else "")
    return kind, index, label


def plot_near_zero(results: list[dict[str, Any]], headline: str, path: Path) -> None:
    """Near-zero fraction of the target set against step, one line per run (paper Fig. 8(i))."""
    kind, index, label = _curve_index(results[0], headline)
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for result in results:
        steps = [r["step"] for r in result["steps"]]
        values = [100 * r[kind]["target"][index] for r in result["steps"]]
        (line,) = axis.plot(steps, values, marker=".", label=result["label"])
        bend = result["transitions"][headline]["change_point"]
        if bend is not None:
            axis.axvline(bend["step"], color=line.get_color(), linestyle=":", linewidth=1)
    axis.set_xlabel("pre-training step")
    axis.set_ylabel(f"% of target weights with {label}")
    axis.set_title("Near-zero weights during pre-training (dotted: change point)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_mask_overlap(results: list[dict[str, Any]], path: Path) -> None:
    """IoU of each checkpoint's OMP mask with the previous and the final one, per sparsity."""
    sparsities = results[0]["settings"]["sparsities"]
    figure, axes = plt.subplots(1, len(sparsities), figsize=(4.2 * len(sparsities), 3.6),
                                squeeze=False)
    for column, sparsity in enumerate(sparsities):
        axis = axes[0, column]
        for result in results:
            steps = [r["step"] for r in result["steps"]]
            masks = [r["masks"][column] for r in result["steps"]]
            final = [m["final"]["iou"] for m in masks]
            (line,) = axis.plot(steps, final, label=f"{result['label']} vs final")
            previous = [(s, m["previous"]["iou"]) for s, m in zip(steps, masks, strict=True)
                        if m["previous"] is not None]
            if previous:
                axis.plot(*zip(*previous, strict=True), linestyle="--", color=line.get_color(),
                          label=f"{result['label']} vs previous")
        axis.axhline(results[0]["steps"][-1]["masks"][column]["final"]["chance_iou"],
                     color="grey", linewidth=1, label="chance")
        axis.set_title(f"OMP mask at {sparsity:.0%} sparsity")
        axis.set_xlabel("pre-training step")
        axis.set_ylabel("IoU of the pruned sets")
        axis.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_components(results: list[dict[str, Any]], headline: str, path: Path) -> None:
    """Near-zero fraction of each component (q, k, v, out, FFN in/out) against step, per run."""
    kind, index, label = _curve_index(results[0], headline)
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False,
                                sharey=True)
    for axis, result in zip(axes[0], results, strict=True):
        steps = [r["step"] for r in result["steps"]]
        for component in result["steps"][0]["components"]:
            values = [100 * r["components"][component][kind][index] for r in result["steps"]]
            axis.plot(steps, values, label=component)
        axis.set_title(result["label"], fontsize=9)
        axis.set_xlabel("pre-training step")
        axis.grid(alpha=0.3)
    axes[0, 0].set_ylabel(f"% with {label}")
    axes[0, -1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_all(results: list[dict[str, Any]], headline: str, directory: Path) -> list[Path]:
    """Writes the three emergence figures into `directory`; returns their paths."""
    paths = [directory / name for name in
             ("emergence_near_zero.png", "emergence_mask_overlap.png", "emergence_components.png")]
    plot_near_zero(results, headline, paths[0])
    plot_mask_overlap(results, paths[1])
    plot_components(results, headline, paths[2])
    return paths
