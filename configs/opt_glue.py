"""es-jax sweep --config configs/opt_glue.py --workdir runs/opt_glue

OPT-125m, OPT-350m and OPT-1.3b: one-shot global magnitude pruning of q, k, v, out, fc1 and fc2
of every decoder layer at 0-90%, then fine-tuning with the mask fixed on MNLI, QNLI, QQP, SST-2 and
RTE (sequence classification on the last token; accuracy): the paper's Figure 2. OPT-350m also
runs N:M masks (keep N of every M along the input axis: 3:4, 2:4 and 1:4, i.e. 25, 50 and 75%
sparsity) on MNLI, QNLI, RTE and SST-2: Figure 5. Needs the hub, the tfds catalogue data and an
accelerator. Smoke run: `--config configs/opt_glue.py:tiny`.
"""

import ml_collections

from es_jax.commands import sweep_config

GLUE = ("glue/mnli", "glue/qnli", "glue/qqp", "glue/sst2", "glue/rte")
N_OF_M_TASKS = ("glue/mnli", "glue/qnli", "glue/rte", "glue/sst2")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The experiment's config; variant 'tiny' for a smoke run."""
    config = sweep_config.default_config()
    config.models = ml_collections.ConfigDict()
    for size in ("125m", "350m", "1.3b"):
        config.models[f"opt_{size.replace('.', '_')}"] = sweep_config.model_settings(
            name=f"facebook/opt-{size}",
            tasks=GLUE,
            scorers=("magnitude",),
            patterns=("global",),
            max_length=128,
            batch_size=64,
        )
    config.models.opt_350m_n_of_m = sweep_config.model_settings(
        name="facebook/opt-350m",
        tasks=N_OF_M_TASKS,
        scorers=("magnitude",),
        patterns=("3:4", "2:4", "1:4"),
        max_length=128,
        batch_size=64,
    )
    return sweep_config.with_variant(config, variant, dict.fromkeys(config.models, "opt"))
