"""es-jax sweep --config configs/vicuna_perplexity.py --workdir runs/vicuna_perplexity

Vicuna-7B pruned zero-shot (no fine-tuning), as in the paper's section 7: one-shot magnitude and
Wanda pruning of q, k, v, o, gate, up and down of every layer at 0-90%, layer-wise (each matrix
at the level's sparsity, as the paper's code prunes; an exact global selection counts in 32 bits
and refuses the 6.5e9 target weights of a 7B model) and 2:4, and SparseGPT (the paper's
comparison) per layer and 2:4 in an entry of its own, scored by MMLU accuracy
(the paper's Figure 11 uses MMLU; here 5-shot, MMLU's standard, each choice's letter scored by its
log-likelihood) and by perplexity on a fixed Wikipedia text (64 blocks of 1,024 tokens). MMLU's
data is not available offline, so the bundled "facts" question set (75 questions in MMLU's
format) stands in for it; give the real MMLU data folder (its `test/` and `dev/` CSV files) with
`--config.models.vicuna_7b.mc_data=/path/to/mmlu/data`. Weights load in bfloat16 (13.5 GB);
the sweep holds them, one byte per target weight for its levels (6.5 GB) and one batch's
activations: XLA:CPU's memory analysis puts its peak at 3.9x the parameters' bytes (53 GB, the
MMLU batch; an upper bound, as XLA:CPU also holds float32 copies of bfloat16 weights), and
Wanda's curves add its float32 scores (26 GB), so one H200 holds it (benchmarks/sweep_memory.py).
Needs the hub checkpoint. On several devices,
batch_size must be a multiple of their count (`config.mesh`; --config.mesh.fsdp=N shards the
weights over N devices). Smoke run: `--config configs/vicuna_perplexity.py:tiny`.
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
        dtype="bfloat16",  # the checkpoint's own dtype: 13.5 GB of parameters instead of 27
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
        scorers=("magnitude", "wanda"), patterns=("layerwise", "2:4"), **common
    )
    config.models.vicuna_7b_sparsegpt = sweep_config.model_settings(
        scorers=("sparsegpt",), patterns=("layerwise", "2:4"), **common
    )
    families = {"vicuna_7b": "llama", "vicuna_7b_sparsegpt": "llama"}
    return sweep_config.with_variant(config, variant, families)
