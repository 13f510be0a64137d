r"""BERT-base MLM pre-training from scratch, the paper's emergence setting (section 5, Fig. 8).

On a Cloud TPU pod slice, with tpu_scripts/ (every host runs the same command; the workdir is a
bucket mounted at /gcs/BUCKET on all hosts):
  BUCKET=my-bucket tpu_scripts/create.sh
  BUCKET=my-bucket tpu_scripts/launch.sh data_100 --config.data.fraction=1.0
  which runs on every host:
  es-jax pretrain --config configs/bert_base_pretrain.py --workdir /gcs/BUCKET/runs/data_100 \
      --config.data.fraction=1.0
then the other data volumes (0.9 / 0.8 / 0.7 / 0.6), each in its own workdir, and
  BUCKET=my-bucket tpu_scripts/emergence.sh   (es-jax emergence --workdir /gcs/BUCKET/runs)

Bookcorpus comes through tfds's Hugging Face namespace ("huggingface:bookcorpus", which needs the
`datasets` package and network access where the job runs). The paper leaves batch size, learning
rate and sequence length unstated; these are the usual BERT recipe at 50k steps.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """bert-base, 50k steps, a checkpoint every 1k, 100% of bookcorpus unless overridden."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = ml_collections.ConfigDict(
        dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
            dropout=0.1,
        )
    )
    config.data = ml_collections.ConfigDict(
        dict(
            corpora=("huggingface:bookcorpus",),
            fraction=1.0,
            seed=0,
            seq_len=128,
            tokenizer="bert-base-uncased",  # vocabulary 30,522 as in the paper
            vocab_size=30522,
        )
    )
    config.global_batch_size = 256
    config.total_steps = 50_000
    config.checkpoint_every = 1_000
    config.log_spaced_checkpoints = 10
    config.learning_rate = 1e-4
    config.warmup_steps = 5_000
    config.weight_decay = 0.01
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-6
    config.grad_clip_norm = 1.0
    config.mask_rate = 0.15
    config.compute_dtype = "bfloat16"
    config.fsdp = False
    config.distributed = True
    config.async_checkpoints = True
    config.log_every = 100
    config.force = False
    return config
