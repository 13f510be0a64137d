"""`es-jax emergence`: near-zero weights and OMP mask overlap across pre-training checkpoints.

    es-jax emergence --workdir runs/emergence [--config.thresholds=0.001,0.01 ...]

`--workdir` is one pre-training run (it holds `checkpoints/`) or a folder of runs (one per data
volume, say). Streams over each run's checkpoints (`es_jax.analysis.emergence`, one checkpoint's
parameters in memory at a time) and writes `emergence.json` into each run and into the workdir,
with plots. A run's stored analysis is reused when its checkpoints and settings are unchanged.
A checkpoint that cannot be read as saved (files cut short, or arrays that no longer match their
checksums) is skipped with a warning naming it; a run whose weights hold NaN or inf (it diverged)
is refused, naming the run and the step.

The analysis runs on the device mesh of `config.mesh` (`es_jax.mesh`): each checkpoint's
parameters placed with `mesh.shard` (FSDP-sharded by `--config.mesh.fsdp`, else replicated), its
masks and near-zero counts computed there. Only host 0 writes files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from es_jax.commands import command_line
from es_jax.commands.command_line import mesh_settings

SUMMARY = "Near-zero weights and mask overlap across the checkpoints of pre-training runs."


def default_config() -> ml_collections.ConfigDict:
    """The analysis settings: thresholds, mask sparsities, target set and headline curve."""
    config = ml_collections.ConfigDict()
    config.where = ""  # target-set regex; '' = the PRUNABLE set of the checkpoints' model family
    config.thresholds = (1e-4, 1e-3, 1e-2)  # absolute |w| thresholds
    config.relative_thresholds = (0.01, 0.05, 0.1)  # thresholds in units of each matrix's std
    config.sparsities = (0.2, 0.5, 0.8)  # global OMP mask sparsities compared across steps
    config.headline = ""  # the curve compared across runs; '' = near_zero at the middle threshold
    config.mesh = mesh_settings()  # devices along the data and fsdp axes (es_jax.mesh)
    return config


DEFAULT_CONFIG = default_config


def main(argv: Sequence[str]) -> None:
    """`es-jax emergence`: parses the command line and analyses the runs."""
    config, workdir = command_line.parse("emergence", argv, DEFAULT_CONFIG)
    report = run(config, workdir)
    print(json.dumps(report["comparison"], indent=1))


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Analyses the run(s) under `workdir`; writes emergence.json and plots; returns the report."""
    from es_jax import mesh as mesh_lib
    from es_jax.analysis import emergence
    from es_jax.train import checkpointing

    workdir = command_line.check_workdir(workdir)
    mesh = mesh_lib.from_config(config.mesh)
    runs = [checkpointing.open_run(run) for run in checkpointing.find_runs(workdir)]
    return emergence.emergence(
        workdir,
        runs,
        where=config.where or None,
        thresholds=[float(t) for t in config.thresholds],
        relative_thresholds=[float(t) for t in config.relative_thresholds],
        sparsities=[float(s) for s in config.sparsities],
        headline=config.headline or None,
        progress=True,
        mesh=mesh,
    )
