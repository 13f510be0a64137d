"""Training: masked optax updates, masked fine-tuning, IMP (lottery tickets), pre-training with
Orbax (MLM BERT; a ViT supervised or DINO-style: `pretrain`, `objectives`, `mlm`, `vision`, `dino`),
and pre-training checkpoints loaded as models (`checkpoint_models`).

`es_jax.train.finetune` is the fine-tuning module (its entry point is
`es_jax.train.finetune.finetune`); the names below are the ones other packages build on.
"""

from es_jax.train.finetune import PAPER_SETTINGS, FinetuneConfig, finetune_config
from es_jax.train.lottery import ImpConfig, Round, imp, sparsity_schedule
from es_jax.train.masked import keep_pruned_zero

__all__ = [
    "PAPER_SETTINGS",
    "FinetuneConfig",
    "ImpConfig",
    "Round",
    "finetune_config",
    "imp",
    "keep_pruned_zero",
    "sparsity_schedule",
]
