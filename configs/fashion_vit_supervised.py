r"""es-jax pretrain --config configs/fashion_vit_supervised.py --workdir runs/ssl_vs_sl/supervised

A 4-layer ViT (hidden 128, 4x4 patches) pre-trained with labels on Fashion-MNIST's 60,000 training
images: cross-entropy on one augmented view (random resized crop and flip) per image, AdamW, 1,500
steps of 64 images. The supervised half of the paper's SSL-vs-SL comparison (Figures 6-7) at CPU
scale; its self-supervised twin is configs/fashion_vit_dino.py (same backbone, optimizer and images
seen). Ends with the k-NN accuracy of its backbone in results.json. Re-run the command to resume.
Smoke run: `--config configs/fashion_vit_supervised.py:tiny`.
"""

import ml_collections

from es_jax.commands import pretrain_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The supervised ViT on Fashion-MNIST; variant 'tiny' for a smoke run."""
    return pretrain_config.vision_config("supervised", variant)
