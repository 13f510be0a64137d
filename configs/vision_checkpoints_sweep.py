r"""es-jax sweep --config configs/vision_checkpoints_sweep.py --workdir runs/ssl_vs_sl/knn_steps

Figure 8 (ii) for the vision runs, zero-shot: the checkpoints at steps 100, 500 and 1,500 of the
supervised and the DINO-style ViT pre-trained on Fashion-MNIST (configs/fashion_vit_*.py, into
runs/ssl_vs_sl/supervised and runs/ssl_vs_sl/dino), each pruned by global magnitude at 0-90%, and
the k-NN accuracy of its [CLS] features on Fashion-MNIST (bank: 50 labelled training images a
class; queries: the first 2,000 test images) and on digits (a seeded 80/20 split). Essential
sparsity: 1 point of accuracy. Smoke run (tiny random ViTs): `--config
configs/vision_checkpoints_sweep.py:tiny`.
"""

import ml_collections

from es_jax.commands import sweep_config

RUNS = {"supervised": "runs/ssl_vs_sl/supervised", "dino": "runs/ssl_vs_sl/dino"}
STEPS = (100, 500, 1500)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Three checkpoints of each run, k-NN on two tasks; variant 'tiny' for a smoke run."""
    config = sweep_config.default_config()
    config.models = ml_collections.ConfigDict()
    for key, run_dir in RUNS.items():
        for step in STEPS:
            config.models[f"{key}_step_{step}"] = sweep_config.model_settings(
                name=f"checkpoint:{run_dir}@{step}", tasks=("fashion_knn", "digits_knn"),
                scorers=("magnitude",), patterns=("global",), image_size=28, batch_size=250,
                labels_per_class=50, max_examples=2000,
            )
    return sweep_config.with_variant(config, variant, {key: "vit" for key in config.models})
