r"""es-jax sweep --config configs/ssl_vs_sl_sweep.py --workdir runs/ssl_vs_sl/sweep

The paper's Figure 6 at CPU scale: essential sparsity of the supervised and the DINO-style ViT
pre-trained here on Fashion-MNIST (first run `es-jax pretrain --config
configs/fashion_vit_supervised.py --workdir runs/ssl_vs_sl/supervised` and the same with
configs/fashion_vit_dino.py into runs/ssl_vs_sl/dino). Each backbone (the newest checkpoint of its
run) is pruned by global magnitude at 0-90% and fine-tuned with the mask fixed, with a new
classifier, on two downstream tasks: Fashion-MNIST with 50 labelled images a class (accuracy on
the first 2,000 test images) and scikit-learn's 8x8 digits resized to 28x28 (a seed's random 80%
to train, accuracy on its 20%), three seeds per level (head, data order, digits split); essential
sparsity by the paper's rule on the means and against the seed spread. Beside it, the zero-shot
curve: k-NN accuracy of the pruned backbone's [CLS] features on the same images.
Smoke run (tiny random ViTs, no checkpoints needed): `--config configs/ssl_vs_sl_sweep.py:tiny`.
"""

import ml_collections

from es_jax.commands import sweep_config

RUNS = {"supervised": "runs/ssl_vs_sl/supervised", "dino": "runs/ssl_vs_sl/dino"}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Both backbones, fine-tuned (3 seeds) and k-NN; variant 'tiny' for a smoke run."""
    config = sweep_config.default_config()
    config.models = ml_collections.ConfigDict()
    common = dict(scorers=("magnitude",), patterns=("global",), image_size=28, batch_size=250,
                  labels_per_class=50, max_examples=2000)
    for key, run_dir in RUNS.items():
        config.models[f"{key}_finetune"] = sweep_config.model_settings(
            name=f"checkpoint:{run_dir}",
            tasks=("fashion_mnist_few", "digits"),
            seeds=(0, 1, 2),
            finetune={"num_epochs": 4, "batch_size": 32, "learning_rate": 5e-4,
                      "warmup_steps": 10, "weight_decay": 0.01, "max_grad_norm": 1.0},
            **common,
        )
        config.models[f"{key}_knn"] = sweep_config.model_settings(
            name=f"checkpoint:{run_dir}", tasks=("fashion_knn", "digits_knn"), **common
        )
    return sweep_config.with_variant(config, variant, {key: "vit" for key in config.models})
