r"""A tiny BERT that pre-trains in well under a minute: for tests and for checking resume by hand.

  es-jax pretrain --config configs/pretrain_smoke.py --workdir runs/smoke
  (kill it at any moment and run the same command again: it resumes)
  es-jax emergence --workdir runs/smoke
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """2 layers, hidden 32, a 500-piece vocabulary on news text, 30 steps, checkpoints every 10."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = ml_collections.ConfigDict(
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            dropout=0.1,
        )
    )
    config.data = ml_collections.ConfigDict(
        dict(
            corpora=("lee_background",),
            fraction=1.0,
            seed=0,
            seq_len=32,
            tokenizer="wordpiece",
            vocab_size=500,
        )
    )
    config.global_batch_size = 8
    config.total_steps = 30
    config.checkpoint_every = 10
    config.log_spaced_checkpoints = 3
    config.learning_rate = 1e-3
    config.warmup_steps = 5
    config.weight_decay = 0.01
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-6
    config.grad_clip_norm = 1.0
    config.mask_rate = 0.15
    config.compute_dtype = "float32"
    config.fsdp = False
    config.distributed = False
    config.async_checkpoints = True
    config.log_every = 10
    config.force = False
    return config
