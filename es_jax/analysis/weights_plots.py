"""Plots of `es-jax weights` (the paper's Figure 7): per-layer normalised-weight densities of the
models overlaid, and their near-zero fractions with the differences to the reference.

Both take the weights.json document (`es_jax.analysis.weights.weights_report`), write a PNG and
return its path. matplotlib runs headless (Agg).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from es_jax.analysis.plots import panel_grid, save_figure
from es_jax.analysis.weights import densities, layer_order


def plot_all(report: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """distributions.png and near_zero.png in `directory`."""
    directory = Path(directory)
    return [plot_distributions(report, directory / "distributions.png"),
            plot_near_zero(report, directory / "near_zero.png")]


def plot_distributions(report: Mapping[str, Any], path: str | Path) -> Path:
    """One panel per layer (block), 4 a row: each model's density of normalised target weights
    (w / std of its matrix) as a step line over the stored bins; the legend gives each model's
    near-zero percentage at the smallest threshold."""
    edges = np.asarray(report["bin_edges"])
    models = report["models"]
    layers = sorted({layer for record in models.values() for layer in record["histograms"]},
                    key=layer_order)
    rows, columns = panel_grid(len(layers), 4)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows),
                                squeeze=False, sharex=True)
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    threshold = report["thresholds"][0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, layer in zip(axes.flat, layers, strict=False):
        for i, (label, record) in enumerate(models.items()):
            histogram = record["histograms"].get(layer)
            if histogram is None:
                continue
            density = densities(histogram, edges)
            near = record["near_zero"]["layers"][layer][0]
            colour = colours[i % len(colours)]
            ax.stairs(density, edges, fill=True, alpha=0.2, color=colour)
            ax.stairs(density, edges, color=colour,
                      label=f"{label}: {100 * near:.2f}% < {threshold:g}")
        ax.set_title(f"block {layer}", fontsize=9)
        ax.set_xlabel("w / std of its matrix", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.legend(fontsize=6, loc="upper right")
    figure.suptitle("Normalised target weights per layer (legend: % with |w| / std below "
                    f"{threshold:g})", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_near_zero(report: Mapping[str, Any], path: str | Path) -> Path:
    """Left: % of each model's target weights with |w| / std below each threshold (bars); with
    other models than the reference, middle: their differences to the reference in points over
    the target set, right: the same per layer (one line per model and threshold)."""
    thresholds, models = report["thresholds"], report["models"]
    differences = report["differences"]
    columns = 3 if differences else 1
    figure, axes = plt.subplots(1, columns, figsize=(5.0 * columns, 3.8), squeeze=False)
    positions = np.arange(len(thresholds))
    width = 0.8 / len(models)
    ax = axes[0, 0]
    for i, (label, record) in enumerate(models.items()):
        values = [100 * v for v in record["near_zero"]["target"]]
        ax.bar(positions + i * width, values, width, label=label)
    ax.set_xticks(positions + width * (len(models) - 1) / 2, [f"{t:g}" for t in thresholds])
    ax.set_xlabel("threshold (x std of each matrix)")
    ax.set_ylabel("% of target weights below it")
    ax.set_title("Near-zero weights", fontsize=10)
    ax.legend(fontsize=8)
    if differences:
        plot_differences(axes[0, 1], axes[0, 2], report)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_differences(overall: plt.Axes, per_layer: plt.Axes, report: Mapping[str, Any]) -> None:
    """The differences to the reference in points: bars per threshold over the target set on
    `overall`, lines across layers on `per_layer`."""
    thresholds, reference = report["thresholds"], report["reference"]
    differences = report["differences"]
    positions = np.arange(len(thresholds))
    width = 0.8 / len(differences)
    for i, (label, difference) in enumerate(differences.items()):
        overall.bar(positions + i * width, difference["target"], width, label=label)
        layers = sorted(difference["layers"], key=layer_order)
        for t, threshold in enumerate(thresholds):
            per_layer.plot(layers, [difference["layers"][layer][t] for layer in layers],
                           marker=".", label=f"{label}, {threshold:g}")
    overall.set_xticks(positions + width * (len(differences) - 1) / 2,
                       [f"{t:g}" for t in thresholds])
    for ax in (overall, per_layer):
        ax.axhline(0.0, color="black", lw=0.5)
        ax.set_ylabel(f"points minus {reference}")
        ax.legend(fontsize=7)
    overall.set_xlabel("threshold (x std of each matrix)")
    overall.set_title(f"Difference to {reference}, target set", fontsize=10)
    per_layer.set_xlabel("block")
    per_layer.set_title(f"Difference to {reference}, per layer", fontsize=10)
