"""es-jax weights --config configs/ssl_vs_sl_weights.py --workdir runs/ssl_vs_sl_weights

Supervised against self-supervised pre-training, weight by weight (the paper's section 4, Figure
7): supervised ViT-B/16 (google/vit-base-patch16-224-in21k) and DINO ViT-B/16
(facebook/dino-vitb16), one architecture. Each target matrix (q, k, v, out, fc1, fc2 of every
block) is divided by its own standard deviation; per layer, the histogram of these normalised
weights, and the fraction of normalised |w| below 0.01, 0.02, 0.05 and 0.1 per layer and over the
target set, DINO minus supervised in points (the paper: DINO holds about 14% more near-zero
weights). Needs the hub (or its cache). Our own pre-training runs instead of the hub checkpoints:
`--config.models.supervised=RUN_DIR --config.models.dino=RUN_DIR[@STEP]`.

`:tiny` compares step 10 with the final checkpoint of the smoke pre-training run, made first by
`es-jax pretrain --config configs/pretrain_smoke.py --workdir runs/smoke` (seconds on a CPU).
"""

from es_jax.commands import weights_config


def get_config(variant: str = ""):
    """Supervised ViT-B/16 vs DINO ViT-B/16; variant 'tiny' for the smoke run."""
    return weights_config.get_config(variant)
