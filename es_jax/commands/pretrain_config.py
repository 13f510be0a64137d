"""The config of `es-jax pretrain`: every key with its meaning, and the `:tiny` variant.

`get_config()` is the small BERT that the CPU emergence run pre-trains (configs/pretrain_cpu.py);
the other pre-training configs derive from it and change only what differs. `with_variant(config,
"tiny")` shrinks any of them to a smoke run that pre-trains in well under a minute offline.
"""

from __future__ import annotations

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """4-layer BERT (hidden 128) on the offline Wikipedia + news text, 2,000 steps."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = ml_collections.ConfigDict(
        dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=128,
            dropout=0.1,
        )
    )
    config.data = ml_collections.ConfigDict(
        dict(
            corpora=("wikipedia", "lee_background"),  # offline names, or tfds names with `text`
            fraction=1.0,  # the data volume: a seeded random fraction of the documents
            seed=0,
            seq_len=64,
            tokenizer="wordpiece",  # trained on the corpora, cached in the workdir; or a hub name
            vocab_size=8000,
        )
    )
    config.global_batch_size = 32
    config.total_steps = 2_000
    config.checkpoint_every = 100
    config.log_spaced_checkpoints = 6  # extra checkpoints at log-spaced early steps
    config.learning_rate = 1e-3
    config.warmup_steps = 200
    config.weight_decay = 0.01
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-6
    config.grad_clip_norm = 1.0
    config.mask_rate = 0.15
    config.compute_dtype = "float32"
    config.fsdp = False  # shard each parameter's largest axis over the devices
    config.distributed = False  # jax.distributed.initialize() first (multi-host)
    config.async_checkpoints = True
    config.log_every = 50
    config.force = False  # continue a workdir whose stored config differs
    return with_variant(config, variant)


def with_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """The config as it is (variant ''), or shrunk to a smoke run (variant 'tiny'): the tiny BERT
    (2 layers of hidden 32), a 500-piece vocabulary on the news text, 30 steps, a checkpoint
    every 10."""
    if variant == "tiny":
        from es_jax.models import hub

        sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        tiny = hub.TINY_HF_CONFIGS["bert"]
        config.model.update({key: tiny[key] for key in sizes}, max_position_embeddings=64)
        config.data.update(
            corpora=("lee_background",), seq_len=32, tokenizer="wordpiece", vocab_size=500
        )
        config.update(
            global_batch_size=8,
            total_steps=30,
            checkpoint_every=10,
            log_spaced_checkpoints=3,
            warmup_steps=5,
            compute_dtype="float32",
            distributed=False,
            log_every=10,
        )
    elif variant:
        raise ValueError(f"unknown config variant {variant!r}; use FILE or FILE:tiny.")
    return config
