"""es-jax sweep --config configs/llm_methods.py --workdir runs/llm_methods

Magnitude, Wanda and SparseGPT side by side on the real SmolLM2-135M (the paper's Figure 11 at CPU
scale): perplexity on the fixed Wikipedia text at 0-70% unstructured sparsity and at 2:4 and 4:8,
each method as its reference prunes: magnitude per kernel by |w|, Wanda per output unit by
|W| * ||X||, SparseGPT per block of 128 input columns with OBS error compensation; Wanda and
SparseGPT calibrate block by block on Lee background news (which no evaluation reads), with inputs
through the already pruned blocks. One model entry per method (each takes its own patterns), so
the dense value is evaluated once per entry. Every level records the seconds its pruning took.
About 20 minutes on 2 cores; smoke run: `--config configs/llm_methods.py:tiny`.
"""

import ml_collections

from es_jax.commands import sweep_config

METHODS = {
    "magnitude": ("magnitude", "layerwise"),
    "wanda": ("wanda_sequential", "per_output"),
    "sparsegpt": ("sparsegpt", "layerwise"),
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The experiment's config; variant 'tiny' for a smoke run."""
    config = sweep_config.default_config()
    config.grid = tuple(round(0.1 * i, 1) for i in range(8))
    config.models = ml_collections.ConfigDict()
    for method, (scorer, unstructured) in METHODS.items():
        config.models[f"smollm2_{method}"] = sweep_config.model_settings(
            name="smollm2",
            tasks=("wikitext",),
            scorers=(scorer,),
            patterns=(unstructured, "2:4", "4:8"),
            lm_length=256,
            lm_blocks=32,
            batch_size=4,
            calibration_text="lee_background",
            calibration_blocks=32,
            calibration_length=256,
        )
    families = {key: "llama" for key in config.models}
    return sweep_config.with_variant(config, variant, families)
