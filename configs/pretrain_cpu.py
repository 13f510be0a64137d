r"""A small BERT pre-trained on the offline Wikipedia + news text, to watch sparsity emerge on CPU.

Five data volumes, five runs (about 18 minutes each on 2 cores; re-run a command to resume):
  for f in 100 90 80 70 60; do
    es-jax pretrain --config configs/pretrain_cpu.py --workdir runs/emergence/data_$f \
        --config.data.fraction=0.$f    # use 1.0 for 100
  done
  es-jax emergence --workdir runs/emergence

The WordPiece vocabulary is trained on the whole corpus (all volumes share it) and cached in each
run's workdir as tokenizer.json.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """4-layer BERT (hidden 128), 2,000 steps, a checkpoint every 100 and log-spaced early ones."""
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
            corpora=("wikipedia", "lee_background"),
            fraction=1.0,
            seed=0,
            seq_len=64,
            tokenizer="wordpiece",
            vocab_size=8000,
        )
    )
    config.global_batch_size = 32
    config.total_steps = 2_000
    config.checkpoint_every = 100
    config.log_spaced_checkpoints = 6
    config.learning_rate = 1e-3
    config.warmup_steps = 200
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
    config.log_every = 50
    config.force = False
    return config
