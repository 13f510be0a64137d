"""Lottery-ticket figures: LTH minus OMP against sparsity, and mask similarity heat maps.

Both take the `runs` (and `task_similarity`) of an `es-jax lth` results.json, write a PNG and
return its path. matplotlib runs headless (Agg, set by `es_jax.analysis.plots`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from es_jax.analysis.plots import panel_grid, save_figure


def plot_lth_minus_omp(runs: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """The paper's Figure 9 view: per task, the mean over seeds of the paired differences LTH -
    OMP (same seed, split and fine-tuning) against sparsity, error bars their sample std (none
    for one seed), and the zero line (above it, the ticket is better)."""
    figure, ax = plt.subplots(figsize=(5.6, 3.8))
    for run in runs:
        levels = run["levels"]
        x = [100 * level["sparsity"] for level in levels]
        y = [level["lth_minus_omp"]["mean"] for level in levels]
        error = [level["lth_minus_omp"]["std"] or 0.0 for level in levels]
        ax.errorbar(x, y, yerr=error, marker="o", ms=4, capsize=3,
                    label=f"{run['task']} ({len(run['seeds'])} seeds)")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("sparsity of the target weights (%)")
    ax.set_ylabel(f"LTH - OMP ({runs[0]['metric']}, points)")
    ax.set_title("Lottery tickets minus one-shot magnitude pruning")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def similarity_matrix(runs: Sequence[Mapping[str, Any]],
                      task_similarity: Sequence[Mapping[str, Any]],
                      sparsity: float) -> tuple[list[str], np.ndarray]:
    """The labels (OMP, then LTH of each task) and the symmetric matrix of mean cosine
    similarities of their masks at `sparsity` (1 on the diagonal)."""
    tasks = [run["task"] for run in runs]
    matrix = np.eye(len(tasks) + 1)
    for i, run in enumerate(runs, start=1):
        (level,) = [level for level in run["levels"] if level["sparsity"] == sparsity]
        matrix[0, i] = matrix[i, 0] = level["similarity"]["cosine"]
    for pair in task_similarity:
        if pair["sparsity"] == sparsity:
            i, j = (tasks.index(task) + 1 for task in pair["tasks"])
            matrix[i, j] = matrix[j, i] = pair["cosine"]
    return ["OMP", *(f"LTH {task}" for task in tasks)], matrix


def plot_similarity(runs: Sequence[Mapping[str, Any]],
                    task_similarity: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """The paper's Figure 10 view: one heat map per sparsity of the cosine similarity (averaged
    over seeds) between the OMP mask and each task's ticket, and between the tickets of two
    tasks; the values are written in the cells, the chance cosine of two random masks of these
    densities in the title, where the colour scale starts (so colour shows overlap above
    chance)."""
    levels = runs[0]["levels"]
    rows, columns = panel_grid(len(levels), 3)
    size = 1.1 * (len(runs) + 1) + 1.6
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows),
                                squeeze=False)
    for ax in axes.flat[len(levels):]:
        ax.set_visible(False)
    for ax, level in zip(axes.flat, levels, strict=False):
        labels, matrix = similarity_matrix(runs, task_similarity, level["sparsity"])
        chance = level["similarity"]["chance_cosine"]
        ax.imshow(matrix, vmin=min(chance, matrix.min()), vmax=1.0, cmap="viridis")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=8,
                    color="black" if value > chance + 0.6 * (1 - chance) else "white")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(f"{100 * level['sparsity']:g}% sparsity\n(chance cosine "
                     f"{level['similarity']['chance_cosine']:.3f})", fontsize=9)
    figure.tight_layout()
    return save_figure(figure, path)
