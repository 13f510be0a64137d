r"""es-jax pretrain --config configs/pretrain_cpu.py --workdir runs/emergence/data_100

A small BERT pre-trained on the offline Wikipedia + news text, to watch sparsity emerge on CPU.
Five data volumes, five runs (about 18 minutes each on 2 cores; re-run a command to resume):
  for f in 100 90 80 70 60; do
    es-jax pretrain --config configs/pretrain_cpu.py --workdir runs/emergence/data_$f \
        --config.data.fraction=0.$f    # use 1.0 for 100
  done
  es-jax emergence --workdir runs/emergence

The WordPiece vocabulary is trained on the whole corpus (all volumes share it) and cached in each
run's workdir as tokenizer.json; the token ids of the text, tokenised as training reaches it,
are cached in WORKDIR/token_cache. Smoke run: `--config configs/pretrain_cpu.py:tiny`.
"""

import ml_collections

from es_jax.commands import pretrain_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """4-layer BERT (hidden 128), 2,000 steps, a checkpoint every 100 and log-spaced early ones."""
    return pretrain_config.get_config(variant)
