r"""es-jax pretrain --config configs/bert_base_pretrain.py --workdir gs://BUCKET/runs/data_100

BERT-base MLM pre-training from scratch, the paper's emergence setting (section 5, Fig. 8), on a
Cloud TPU pod slice with tpu_scripts/ (every host runs the same command with
--config.distributed=True; checkpoints go straight to the bucket through etils.epath):
  BUCKET=my-bucket tpu_scripts/run_resilient.sh data_100 --config.data.fraction=1.0
(a spot slice, recreated and the run resumed after each preemption), then the other data volumes
(0.9 / 0.8 / 0.7 / 0.6), each in its own workdir, and
  BUCKET=my-bucket tpu_scripts/emergence.sh   (es-jax emergence --workdir gs://BUCKET/runs)

Bookcorpus comes through tfds's Hugging Face namespace ("huggingface:bookcorpus", which needs the
`datasets` package and network access where the job runs), from the tfds data dir
`--config.data.data_dir` (prepared once where every host reads it). Each host reads and
tokenises only its own devices' share of the documents, as training reaches them, and caches
their token ids in WORKDIR/token_cache (`--config.data.cache_dir`), so a resumed run tokenises
nothing twice. The paper leaves batch size, learning rate and sequence length unstated; these
are the usual BERT recipe at 50k steps. Smoke run (offline, tiny):
`--config configs/bert_base_pretrain.py:tiny`.
"""

import ml_collections

from es_jax.commands import pretrain_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """bert-base, 50k steps, a checkpoint every 1k, 100% of bookcorpus unless overridden."""
    config = pretrain_config.get_config()
    config.model.update(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
    )
    config.data.update(
        corpora=("huggingface:bookcorpus",),
        seq_len=128,
        tokenizer="bert-base-uncased",  # vocabulary 30,522 as in the paper
        vocab_size=30522,
    )
    config.update(
        global_batch_size=256,
        total_steps=50_000,
        checkpoint_every=1_000,
        log_spaced_checkpoints=10,
        learning_rate=1e-4,
        warmup_steps=5_000,
        compute_dtype="bfloat16",
        distributed=True,
        log_every=100,
    )
    return pretrain_config.with_variant(config, variant)
