"""`es-jax weights`: layer-wise distributions of normalised weights, near-zero fractions (Fig. 7).

    es-jax weights [--config FILE[:tiny]] --workdir DIR [--config.key=value ...]

    es-jax weights --workdir runs/weights          # supervised ViT-B/16 vs DINO ViT-B/16 (hub)
    es-jax weights --config configs/ssl_vs_sl_weights.py --workdir runs/weights \\
        --config.models.supervised=runs/vit_supervised --config.models.dino=runs/vit_dino@20000

`config.models` maps a label to a source: a pre-training run (`RUN_DIR`: its newest readable
checkpoint; `RUN_DIR@STEP`: a saved step; the backbone of the run's model is read through
`es_jax.train.checkpoint_models`) or anything `es_jax.models.load` takes (a bundled name, a
Hugging Face folder, a hub id such as google/vit-base-patch16-224-in21k). For the target set of
each model (its family's PRUNABLE: q, k, v, out, fc1 and fc2 of every block), each matrix is
normalised by its own standard deviation (w / std(W), the normalisation of
`pruning.near_zero(relative=True)`); `es_jax.analysis.weights` then gives per layer the histogram
of the normalised weights over fixed bins, the fraction of normalised |w| below each of
`config.thresholds` per matrix, per layer and over the target set, and each model's fractions
minus those of `config.reference` in percentage points.

Writes into the workdir: weights.json (the analysis: `weights.weights_report`), weights.csv (per
model, scope and threshold: near-zero % and points minus the reference), distributions.png (one
panel per layer, the models' densities overlaid: the paper's Figure 7 view) and near_zero.png.
A source that cannot be loaded is refused with one line naming its label, run sources before any
model is read. One model's weights are held at a time.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from tqdm.auto import tqdm

from es_jax.commands import command_line, weights_config
from es_jax.commands.sweep_results import write_atomically

SUMMARY = "Layer-wise normalised-weight distributions and near-zero fractions of models (Fig. 7)."
DEFAULT_CONFIG = weights_config.default_config
RESULTS_FILE = "weights.json"
CSV_FIELDS = ("model", "scope", "threshold", "near_zero_percent", "minus_reference_points")


def main(argv: Sequence[str]) -> None:
    """`es-jax weights`: parses the command line, runs the analysis and prints its summary."""
    config, workdir = command_line.parse("weights", argv, DEFAULT_CONFIG)
    report = run(config, workdir)
    print(summary_table(report))
    print(f"\nresults: {workdir / RESULTS_FILE}, {workdir / 'weights.csv'}, plots in {workdir}")


def run(config: ml_collections.ConfigDict, workdir: str | Path, progress: bool = True) -> dict:
    """Analyses every model of the config; writes weights.json, weights.csv and the plots;
    returns the report."""
    from es_jax.analysis import weights, weights_plots

    weights_config.validate(config)
    workdir = command_line.check_workdir(workdir)
    sources = config.models.to_dict()
    check_runs(sources)
    thresholds = [float(t) for t in config.thresholds]
    edges = weights.bin_edges(config.bins, float(config.limit))
    records = {}
    for label, source in tqdm(sources.items(), disable=not progress, unit="model"):
        loaded = model_weights(label, source)
        analysis = weights.analyse_weights(loaded.params, thresholds, edges, loaded.where)
        records[label] = {"source": source, "loaded": loaded.label, **analysis}
    report = weights.weights_report(records, config.reference, thresholds, edges)
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomically(workdir / RESULTS_FILE, json.dumps(report, indent=1, allow_nan=False) + "\n")
    write_csv(weights.csv_rows(report), workdir / "weights.csv")
    weights_plots.plot_all(report, workdir)
    return report


def check_runs(sources: dict[str, str]) -> None:
    """Refuses, before any weights are read, a pre-training run source that cannot be loaded,
    naming its label."""
    from es_jax.train import checkpoint_models

    for label, source in sources.items():
        if checkpoint_models.is_run(source):
            try:
                checkpoint_models.check_source(source)
            except ValueError as error:
                raise ValueError(f"models.{label}: {error}") from None


def model_weights(label: str, source: str) -> Any:
    """The backbone weights of one source as `checkpoint_models.CheckpointParams` (params, target
    set, what was read); a ValueError naming the label if the source cannot be loaded."""
    import jax
    import numpy as np
    from flax import nnx

    from es_jax import models
    from es_jax.train import checkpoint_models

    try:
        if checkpoint_models.is_run(source):
            return checkpoint_models.checkpoint_params(source)
        model, _ = models.load(source, task=None)
    except ValueError as error:
        raise ValueError(f"models.{label}: {error}") from None
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return checkpoint_models.CheckpointParams(params, models.prunable(model), source)


def write_csv(rows: list[dict], path: Path) -> None:
    """weights.csv from `weights.csv_rows`."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def summary_table(report: dict) -> str:
    """Markdown table: per model, % of target weights with |w| / std below each threshold, and
    the points it differs from the reference by."""
    thresholds = report["thresholds"]
    header = "| model | " + " | ".join(f"< {t:g} std" for t in thresholds) + " |"
    lines = [header, "|---|" + "---|" * len(thresholds)]
    for label, record in report["models"].items():
        difference = report["differences"].get(label)
        cells = []
        for i, value in enumerate(record["near_zero"]["target"]):
            cell = f"{100 * value:.2f}%"
            if difference is not None:
                cell += f" ({difference['target'][i]:+.2f} pt)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
