r"""es-jax sweep --config configs/mlm_checkpoints_sweep.py --workdir runs/emergence_volumes/sweep

The paper's Figure 8 (ii)-(iii) at CPU scale: the essential sparsity of MLM pre-training
checkpoints, along one run's steps and across data volumes. First pre-train (about 7 minutes each
on 2 cores):
  for f in 100 50; do
    es-jax pretrain --config configs/pretrain_cpu.py --workdir runs/emergence_volumes/data_$f \
        --config.data.fraction=0.$f --config.total_steps=800    # fraction 1.0 for 100
  done
Each checkpoint (steps 100, 200, 400 and 800 of the 100% run; 400 and 800 of the 50% run) is
pruned by global magnitude at 0-90% and its MLM loss measured, zero-shot, on 16 blocks of 128
tokens of held-out Wikipedia text: the first articles of the offline dump, which no run trains on
or builds its vocabulary from (es_jax.data.corpora.HELD_OUT_ARTICLES). Essential sparsity: 1%
relative epsilon. Smoke run (a tiny random BERT): `--config configs/mlm_checkpoints_sweep.py:tiny`.
"""

import ml_collections

from es_jax.commands import sweep_config

CHECKPOINTS = {
    "data_100_step_100": "runs/emergence_volumes/data_100@100",
    "data_100_step_200": "runs/emergence_volumes/data_100@200",
    "data_100_step_400": "runs/emergence_volumes/data_100@400",
    "data_100_step_800": "runs/emergence_volumes/data_100@800",
    "data_50_step_400": "runs/emergence_volumes/data_50@400",
    "data_50_step_800": "runs/emergence_volumes/data_50@800",
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Six MLM checkpoints, held-out MLM loss; variant 'tiny' for a smoke run."""
    config = sweep_config.default_config()
    config.models = ml_collections.ConfigDict()
    for key, source in CHECKPOINTS.items():
        config.models[key] = sweep_config.model_settings(
            name=f"checkpoint:{source}", tasks=("wikitext_mlm",), scorers=("magnitude",),
            patterns=("global",), lm_length=128, lm_blocks=16, batch_size=16,
        )
    return sweep_config.with_variant(config, variant, {key: "bert" for key in config.models})
