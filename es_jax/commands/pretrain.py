"""`es-jax pretrain`: pre-training with Orbax checkpoints that resume exactly.

    es-jax pretrain --config configs/pretrain_smoke.py --workdir runs/smoke [--config.key=value ...]
    es-jax pretrain --config configs/fashion_vit_dino.py --workdir runs/ssl_vs_sl/dino

Trains the objective the config names (`es_jax.train.pretrain`: MLM BERT on text by default;
`objective` "supervised" or "dino" for a ViT on images), saving checkpoints under
`WORKDIR/checkpoints/`; the same command run again resumes from the newest readable checkpoint.
Writes `results.json` (the last logged metrics, timing and, for vision runs, the backbone's k-NN
accuracy), `train_log.jsonl` and `loss.png`. A workdir that holds another
config is refused unless `--config.force=True`, and a refused command writes nothing there. A run
whose loss, gradient norm or weights become NaN or inf stops with one line naming the step, and
none of its checkpoints holds such weights. Every host of a pod runs the same command
(`--config.distributed=True`); a preempted pod saves the step it stopped at and resumes from it.
`--workdir` may be a `gs://` URL.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from es_jax.commands import command_line

SUMMARY = "Pre-training (MLM, or a ViT supervised/DINO) with Orbax checkpoints; re-run to resume."
DEFAULT_CONFIG = None  # --config is required: configs/pretrain_*.py, configs/fashion_vit_*.py


def main(argv: Sequence[str]) -> None:
    """`es-jax pretrain`: parses the command line and pre-trains (or resumes)."""
    config, workdir = command_line.parse("pretrain", argv, DEFAULT_CONFIG)
    summary = run(config, workdir)
    print(json.dumps({k: v for k, v in summary.items() if k != "checkpoints"}))


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Pre-trains (or resumes) to `config.total_steps`; the loss plot; returns the summary."""
    from es_jax.analysis import plots
    from es_jax.train import checkpointing, pretrain

    workdir = checkpointing.as_path(command_line.check_workdir(workdir))
    summary = pretrain.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
        plots.plot_training_loss(workdir / pretrain.LOG_FILE, workdir / "loss.png", workdir.name)
    return summary
