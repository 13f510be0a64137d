"""es-jax sweep --config configs/vicuna_perplexity.py --workdir runs/vicuna_perplexity

Vicuna-7B pruned zero-shot (no fine-tuning), as in the paper's section 7: one-shot magnitude and
Wanda pruning of q, k, v, o, gate, up and down of every layer at 0-90%, and SparseGPT (the paper's
comparison) per layer and 2:4 in an entry of its own, scored by MMLU accuracy
(the paper's Figure 11 uses MMLU; here 5-shot, MMLU's standard, each choice's letter scored by its
log-likelihood) and by perplexity on a fixed Wikipedia text (64 blocks of 1,024 tokens). MMLU's
data is not available offline, so the bundled "facts" question set (75 questions in MMLU's
format) stands in for it; give the real MMLU data folder (its `test/` and `dev/` CSV files) with
`--config.models.vicuna_7b.mc_data=/path/to/mmlu/data`. Needs the hub checkpoint and an
accelerator with about 30 GB of memory. Smoke run: `--config configs/vicuna_perplexity.py:tiny`.
"""

import ml_collections

from es_jax.commands import sweep_config

# MMLU's data folder (CSV files as in its tarball); "facts" is the bundled offline stand-in.
MMLU_DATA = "facts"


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The experiment's config; variant 'tiny' for a smoke run."""
    config = sweep_config.default_config()
    config.models = ml_collections.ConfigDict()
    common = dict(
        name="lmsys/vicuna-7b-v1.3",
        tasks=("mmlu", "wikitext"),
        mc_data=MMLU_DATA,
        mc_shots=5,
        mc_style="letter",
        max_length=2048,  # 5-shot MMLU prompts: longer ones lose their first examples
        lm_length=1024,
        lm_blocks=64,
        batch_size=4,
        calibration_blocks=32,
        calibration_length=1024,
    )
    config.models.vicuna_7b = sweep_config.model_settings(
        scorers=("magnitude", "wanda"), patterns=("global", "2:4"), **common
    )
    config.models.vicuna_7b_sparsegpt = sweep_config.model_settings(
        scorers=("sparsegpt",), patterns=("layerwise", "2:4"), **common
    )
    families = {"vicuna_7b": "llama", "vicuna_7b_sparsegpt": "llama"}
    return sweep_config.with_variant(config, variant, families)
