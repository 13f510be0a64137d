r"""es-jax pretrain --config configs/pretrain_smoke.py --workdir runs/smoke

A tiny BERT that pre-trains in well under a minute: for tests and for checking resume by hand
(kill it at any moment and run the same command again: it resumes), then
  es-jax emergence --workdir runs/smoke
It is `configs/pretrain_cpu.py:tiny` under a name of its own.
"""

import ml_collections

from es_jax.commands import pretrain_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """2 layers, hidden 32, a 500-piece vocabulary on news text, 30 steps, checkpoints every 10."""
    return pretrain_config.with_variant(pretrain_config.get_config("tiny"), variant)
