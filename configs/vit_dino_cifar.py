"""es-jax sweep --config configs/vit_dino_cifar.py --workdir runs/vit_dino_cifar

Supervised ViT-B/16 (ImageNet-21k) against self-supervised DINO ViT-B/16: one-shot global
magnitude pruning of q, k, v, out, fc1 and fc2 of every block at 0-90%, then fine-tuning with the
mask fixed on CIFAR-10 and CIFAR-100 at 224x224 (45,000 training images, the paper's Table 1
settings; top-1 accuracy on the test split): the paper's Figures 3 and 6. Needs the hub, the tfds
catalogue data and an accelerator. Smoke run: `--config configs/vit_dino_cifar.py:tiny`.
"""

import ml_collections

from es_jax.commands import sweep_config

CIFAR = ("cifar10", "cifar100")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The experiment's config; variant 'tiny' for a smoke run."""
    config = sweep_config.default_config()
    config.models = ml_collections.ConfigDict()
    for key, name in (
        ("vit_base", "google/vit-base-patch16-224-in21k"),
        ("dino_base", "facebook/dino-vitb16"),
    ):
        config.models[key] = sweep_config.model_settings(
            name=name,
            tasks=CIFAR,
            scorers=("magnitude",),
            patterns=("global",),
            image_size=224,
            batch_size=64,
        )
    return sweep_config.with_variant(config, variant, {"vit_base": "vit", "dino_base": "vit"})
