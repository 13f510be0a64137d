"""The configs of `es-jax pretrain`: every key with its meaning, and the `:tiny` variants.

`get_config()` is the small BERT that the CPU emergence run pre-trains (configs/pretrain_cpu.py);
the other MLM configs derive from it and change only what differs. `with_variant(config, "tiny")`
shrinks any of them to a smoke run that pre-trains in well under a minute offline.
`vision_config(objective)` is the small ViT pre-trained on Fashion-MNIST, supervised or DINO-style
(configs/fashion_vit_*.py); `with_vision_variant(config, "tiny")` shrinks it likewise.
"""

from __future__ import annotations

import ml_collections

from es_jax.commands.command_line import mesh_settings


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
            data_dir="",  # tfds data dir; '' = $ES_JAX_DATA_DIR or ~/tensorflow_datasets
            cache_dir="",  # token ids cached by content hash; '' = WORKDIR/token_cache
        )
    )
    config.global_batch_size = 32
    config.total_steps = 2_000
    config.checkpoint_every = 100
    config.log_spaced_checkpoints = 6  # extra checkpoints at log-spaced early steps
    training_keys(config, learning_rate=1e-3, warmup_steps=200, weight_decay=0.01)
    config.mask_rate = 0.15
    return with_variant(config, variant)


def training_keys(
    config: ml_collections.ConfigDict, learning_rate: float, warmup_steps: int, weight_decay: float
) -> None:
    """Adds the optimizer and run keys every pre-training config has."""
    config.learning_rate = learning_rate
    config.warmup_steps = warmup_steps
    config.weight_decay = weight_decay
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-6
    config.grad_clip_norm = 1.0
    config.compute_dtype = "float32"
    config.mesh = mesh_settings()
    config.distributed = False  # jax.distributed.initialize() first (multi-host)
    config.async_checkpoints = True
    config.log_every = 50
    config.force = False  # continue a workdir whose stored config differs


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


def vision_config(objective: str, variant: str = "") -> ml_collections.ConfigDict:
    """A 4-layer ViT (hidden 128, 4x4 patches of 28x28 images) pre-trained on Fashion-MNIST's
    training split, supervised or DINO-style: the same backbone, optimizer and images per step."""
    if objective not in ("supervised", "dino"):
        raise ValueError(f"vision objective must be 'supervised' or 'dino', not {objective!r}.")
    config = ml_collections.ConfigDict()
    config.objective = objective
    config.seed = 0
    config.model = ml_collections.ConfigDict(
        dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            image_size=28,  # global crops (and the supervised view) are this size
            patch_size=4,
            num_channels=1,
            dropout=0.0,
        )
    )
    config.data = ml_collections.ConfigDict(
        dict(
            dataset="fashion_mnist",  # es_jax.data.images.image_arrays name with train/test
            data_dir="",  # '' = $ES_JAX_DATA_DIR or ~/tensorflow_datasets
            num_classes=10,
            seed=0,  # shuffling and augmentation
            global_scale=(0.4, 1.0),  # area fraction of a global crop (and the supervised view)
            local_crops=4,  # DINO: local crops per image
            local_size=12,  # DINO: local crops are this size (a multiple of patch_size)
            local_scale=(0.05, 0.4),
        )
    )
    if objective == "dino":
        config.dino = ml_collections.ConfigDict(
            dict(
                out_dim=1024,  # prototypes of the projection head
                hidden_dim=512,
                bottleneck_dim=128,
                student_temp=0.1,
                teacher_temp=0.04,
                warmup_teacher_temp=0.04,
                teacher_temp_warmup_steps=0,
                center_momentum=0.9,
                momentum_teacher=0.996,  # rises to 1 on a cosine over the run
            )
        )
    config.evaluation = ml_collections.ConfigDict(
        dict(
            bank_examples=10_000,  # k-NN bank: the first N training images (0 = all)
            test_examples=10_000,  # k-NN queries: the first N test images (0 = all)
            k=20,
            temperature=0.07,
            batch_size=500,
        )
    )
    config.global_batch_size = 64
    config.total_steps = 1_500
    config.checkpoint_every = 100
    config.log_spaced_checkpoints = 6
    training_keys(config, learning_rate=5e-4, warmup_steps=100, weight_decay=0.04)
    return with_vision_variant(config, variant)


def with_vision_variant(
    config: ml_collections.ConfigDict, variant: str
) -> ml_collections.ConfigDict:
    """The vision config as it is (variant ''), or shrunk to a smoke run (variant 'tiny'): a
    2-layer ViT of hidden 32, 20 steps of 16 images, a checkpoint every 10, k-NN on 500/200."""
    if variant == "tiny":
        config.model.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64)
        if "dino" in config:
            config.dino.update(out_dim=64, hidden_dim=64, bottleneck_dim=32)
        config.data.update(local_crops=2)
        config.evaluation.update(bank_examples=500, test_examples=200, batch_size=100)
        config.update(
            global_batch_size=16,
            total_steps=20,
            checkpoint_every=10,
            log_spaced_checkpoints=2,
            warmup_steps=5,
            distributed=False,
            log_every=10,
        )
    elif variant:
        raise ValueError(f"unknown config variant {variant!r}; use FILE or FILE:tiny.")
    return config
