r"""es-jax pretrain --config configs/fashion_vit_dino.py --workdir runs/ssl_vs_sl/dino

The same 4-layer ViT as configs/fashion_vit_supervised.py, pre-trained without labels on the same
Fashion-MNIST training images by DINO-style self-distillation: a student and an EMA teacher with
projection heads, two global 28x28 crops and four local 12x12 crops per image, centred and
sharpened teacher targets; same optimizer, steps and images per step as the supervised run. The
checkpoints hold the teacher (what DINO evaluates). Ends with the k-NN accuracy of its backbone in
results.json. Re-run the command to resume. Smoke run: `--config configs/fashion_vit_dino.py:tiny`.
"""

import ml_collections

from es_jax.commands import pretrain_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The DINO ViT on Fashion-MNIST; variant 'tiny' for a smoke run."""
    return pretrain_config.vision_config("dino", variant)
