"""es-jax weights --workdir runs/weights   (this file is the embedded default config)

The config of `es-jax weights` and its checks: the embedded default (`default_config()`, also
`get_config()` so that `--config es_jax/commands/weights_config.py[:tiny]` works like any config
file: supervised ViT-B/16 (ImageNet-21k) against DINO ViT-B/16 from the hub, the paper's Figure
7), the `:tiny` variant (`with_variant`: the early and final checkpoints of the smoke
pre-training run), and `validate`, which refuses a bad config with one line before any work.
"""

from __future__ import annotations

import math

import ml_collections

from es_jax.analysis import weights

SMOKE_RUN = "runs/smoke"  # where configs/pretrain_smoke.py's docstring pre-trains


def default_config() -> ml_collections.ConfigDict:
    """Supervised ViT-B/16 against self-supervised DINO ViT-B/16 (hub), thresholds 1-10% of a
    matrix's std, 160 bins over +-4 std."""
    config = ml_collections.ConfigDict()
    # label -> source: a pre-training run (RUN_DIR: its newest readable checkpoint, or
    # RUN_DIR@STEP) or anything es_jax.models.load takes (bundled name, HF folder, hub id).
    config.models = ml_collections.ConfigDict({
        "supervised": "google/vit-base-patch16-224-in21k",
        "dino": "facebook/dino-vitb16",
    })
    config.reference = "supervised"  # the label the others are compared with
    config.thresholds = weights.THRESHOLDS  # |w| / std of its matrix below these: near zero
    config.bins = weights.BINS  # histogram bins of equal width over [-limit, limit]
    config.limit = weights.LIMIT  # in units of each matrix's std
    return config


TOP_LEVEL_KEYS = frozenset(default_config().keys())


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The embedded default; variant 'tiny' for a smoke run on the smoke pre-training run."""
    return with_variant(default_config(), variant)


def with_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """The config as it is (variant ''), or shrunk to a smoke run (variant 'tiny'): step 10
    ("early", the reference) against the newest checkpoint ("final") of the run that
    `es-jax pretrain --config configs/pretrain_smoke.py --workdir runs/smoke` makes (paths are
    relative to the current directory), thresholds 0.01 and 0.1, 40 bins."""
    if variant == "tiny":
        config.models = ml_collections.ConfigDict(
            {"early": f"{SMOKE_RUN}@10", "final": SMOKE_RUN})
        config.reference = "early"
        config.thresholds = (0.01, 0.1)
        config.bins = 40
    elif variant:
        raise ValueError(f"unknown config variant {variant!r}; use FILE or FILE:tiny.")
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Refuses, with one line naming the key and what to give instead, unknown keys, no models
    or a source that is not a non-empty string, a reference that is none of the models'
    labels, thresholds that are not strictly ascending positive numbers, and non-positive bins
    or limit."""
    unknown = sorted(set(config.keys()) - TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(TOP_LEVEL_KEYS)}.")
    is_group = isinstance(config.models, ml_collections.ConfigDict)
    models = config.models.to_dict() if is_group else {}
    if not models:
        raise ValueError("models: give at least one label: source, e.g. "
                         "--config.models.dino=runs/dino (a pre-training run or a model name).")
    for label, source in models.items():
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"models.{label}={source!r}: give a pre-training run (RUN_DIR or "
                             "RUN_DIR@STEP) or a model name es_jax.models.load takes.")
    if config.reference not in models:
        raise ValueError(f"reference={config.reference!r} is none of the models' labels "
                         f"{sorted(models)}; give one of them.")
    levels = list(config.thresholds)
    numbers = all(isinstance(t, int | float) and math.isfinite(t) and t > 0 for t in levels)
    if not levels or not numbers or levels != sorted(set(levels)):
        raise ValueError(f"thresholds={tuple(levels)} are not strictly ascending positive "
                         "numbers; give e.g. 0.01,0.02,0.05,0.1 (multiples of each matrix's std).")
    if type(config.bins) is not int or config.bins <= 0:
        raise ValueError(f"bins={config.bins!r} must be a positive integer.")
    if not config.limit > 0:
        raise ValueError(f"limit={config.limit!r} must be positive (in units of each matrix's "
                         "std).")
