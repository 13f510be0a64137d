"""es-jax sweep --config configs/bert_base_glue.py --workdir runs/bert_base_glue

bert-base-uncased, one-shot global magnitude pruning of the 72 encoder matrices at 0-90%, then
fine-tuning with the mask fixed on MNLI, QNLI, QQP, SST-2 and RTE (accuracy; the paper's Table 1
settings) and on SQuAD v1.1 (F1): the paper's Figure 2, first panel. Needs the hub (or a cached
checkpoint), the tfds catalogue data and an accelerator. A smoke run with tiny random models and
two training steps: `--config configs/bert_base_glue.py:tiny`.
"""

import ml_collections

from es_jax.commands import sweep_config

GLUE = ("glue/mnli", "glue/qnli", "glue/qqp", "glue/sst2", "glue/rte")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The experiment's config; variant 'tiny' for a smoke run."""
    config = sweep_config.default_config()
    config.plot_sparsity = 0.2  # the paper's Figure 1 shows bert-base at 21.5%
    config.models = ml_collections.ConfigDict()
    config.models.bert_glue = sweep_config.model_settings(
        name="bert-base-uncased",
        tasks=GLUE,
        scorers=("magnitude",),
        patterns=("global",),
        max_length=128,
        batch_size=64,
    )
    config.models.bert_squad = sweep_config.model_settings(
        name="bert-base-uncased",
        tasks=("squad/v1.1",),
        scorers=("magnitude",),
        patterns=("global",),
        max_length=384,
        doc_stride=128,
        batch_size=32,
    )
    return sweep_config.with_variant(config, variant, {"bert_glue": "bert", "bert_squad": "bert"})
