"""Masked-language-model pre-training of BERT from scratch: BERT's 15% masking with 80/10/10
replacement, its loss, and the `Objective` that `es_jax.train.pretrain`'s loop runs.

The corpora and the WordPiece vocabulary come from `es_jax.data`; the vocabulary is trained on the
corpora once and cached in the workdir (`TOKENIZER_FILE`). The training text is dealt into one
document stream per device (`training_dataset`): each host reads and tokenises only its devices'
streams, a chunk of documents at a time as training reaches it, with the token ids cached under
a hash of the texts and the tokenizer (`config.data.cache_dir`, default `WORKDIR/TOKEN_CACHE_DIR`).
The global batch is the devices' rows side by side, so it is the same on one host or many.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from es_jax.data.corpora import training_documents
from es_jax.data.pipelines import packed_lm_dataset
from es_jax.data.wordpiece import cached_wordpiece
from es_jax.mesh import batch_sharding, from_config
from es_jax.train import objectives

TOKENIZER_FILE = "tokenizer.json"
TOKEN_CACHE_DIR = "token_cache"


def mask_tokens(
    key: jax.Array,
    input_ids: jax.Array,
    maskable: jax.Array,
    mask_token_id: int,
    vocab_size: int,
    mask_rate: float = 0.15,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BERT masking: returns (inputs, labels, weights); weights are 1.0 where a token is predicted.

    Each maskable token is chosen with probability `mask_rate`; a chosen token becomes `[MASK]`
    80% of the time, a uniformly random token 10%, and stays itself 10%.
    """
    choose_key, kind_key, random_key = jax.random.split(key, 3)
    chosen = (jax.random.uniform(choose_key, input_ids.shape) < mask_rate) & maskable
    kind = jax.random.uniform(kind_key, input_ids.shape)
    random_tokens = jax.random.randint(random_key, input_ids.shape, 0, vocab_size, input_ids.dtype)
    mask_token = jnp.asarray(mask_token_id, input_ids.dtype)
    inputs = jnp.where(chosen & (kind < 0.8), mask_token, input_ids)
    inputs = jnp.where(chosen & (kind >= 0.8) & (kind < 0.9), random_tokens, inputs)
    return inputs, input_ids, chosen.astype(jnp.float32)


def mlm_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, dict]:
    """Mean cross-entropy over the predicted positions, and accuracy there."""
    per_token = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    )
    count = jnp.maximum(weights.sum(), 1.0)
    loss = (per_token * weights).sum() / count
    accuracy = ((logits.argmax(-1) == labels) * weights).sum() / count
    return loss, {"loss": loss, "accuracy": accuracy, "predicted_tokens": weights.sum()}


def prediction_capacity(seq_len: int, mask_rate: float) -> int:
    """Positions per sequence that a training step scores with the MLM head: the mean of the
    chosen count, Binomial(seq_len, mask_rate), plus 4 standard deviations, rounded up to a
    multiple of 8 and at most seq_len (40 of 128 at 15%: a sequence chooses more about once in
    a million; 112 of 512: about once in 70,000)."""
    mean = seq_len * mask_rate
    bound = mean + 4 * math.sqrt(mean * (1 - mask_rate))
    return min(seq_len, 8 * math.ceil(bound / 8))


def predicted_loss(
    model: nnx.Module, hidden: jax.Array, labels: jax.Array, weights: jax.Array, capacity: int
) -> tuple[jax.Array, dict]:
    """`mlm_loss` of `model.head`'s logits at the predicted positions (weights 1) of BERT's last
    hidden state (B, L, H), computing the head's logits only there.

    Each row's predicted positions are moved to its first `capacity` places (in order, then the
    others) and the head scores those alone, so its vocabulary projection costs capacity / L of
    scoring every position; when some row predicts more than `capacity` tokens, every position is
    scored instead. Either way the loss and metrics are `mlm_loss` over the predicted positions.
    """

    def at_predictions(model: nnx.Module, hidden: jax.Array) -> tuple[jax.Array, dict]:
        first = jnp.argsort(weights == 0, axis=1, stable=True)[:, :capacity]
        chosen = jnp.take_along_axis(hidden, first[..., None], axis=1)
        logits = model.head(chosen)
        return mlm_loss(
            logits,
            jnp.take_along_axis(labels, first, axis=1),
            jnp.take_along_axis(weights, first, axis=1),
        )

    def everywhere(model: nnx.Module, hidden: jax.Array) -> tuple[jax.Array, dict]:
        return mlm_loss(model.head(hidden), labels, weights)

    fits = jnp.all((weights > 0).sum(axis=1) <= capacity)
    return nnx.cond(fits, at_predictions, everywhere, model, hidden)


# ----------------------------------------------------------------------------- model and data


def bert_config(config: ml_collections.ConfigDict, vocab_size: int):
    """The BertConfig of the model to pre-train, with the tokenizer's vocabulary size."""
    from es_jax.models import bert

    model = config.model
    return bert.BertConfig(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        intermediate_size=model.intermediate_size,
        max_position_embeddings=model.max_position_embeddings,
        hidden_dropout_prob=model.dropout,
        attention_probs_dropout_prob=model.dropout,
        dtype=jnp.dtype(config.compute_dtype),
    )


def build_model(config: ml_collections.ConfigDict, vocab_size: int) -> nnx.Module:
    """A freshly initialised BertForMaskedLM, seeded by `config.seed`."""
    from es_jax.models import bert

    rngs = nnx.Rngs(params=config.seed, dropout=config.seed + 1)
    return bert.BertForMaskedLM(bert_config(config, vocab_size), rngs=rngs)


def load_tokenizer(config: ml_collections.ConfigDict, workdir: Path):
    """The run's tokenizer: a WordPiece vocabulary cached in the workdir, or a named one.

    `config` may be a finished run's stored config, which lacks the run-only keys
    (`pretrain.RUN_ONLY_KEYS`: the data dir among them); its vocabulary is cached already.
    """
    if config.data.tokenizer != "wordpiece":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(config.data.tokenizer)
    return cached_wordpiece(
        workdir / TOKENIZER_FILE, config.data.corpora, config.data.vocab_size,
        data_dir=config.data.get("data_dir") or None,
    )


def training_dataset(config: ml_collections.ConfigDict, tokenizer, workdir: Path):
    """This host's grain dataset of packed-sequence batches (endless, reshuffled every epoch):
    the documents dealt into one stream per device of the mesh (`config.mesh`), this host's
    devices' streams side by side in the order their rows take in the global batch."""
    mesh = from_config(config.mesh)
    rows = host_rows(mesh)
    return packed_lm_dataset(
        training_documents(
            config.data.corpora, config.data.fraction, config.data.seed,
            data_dir=config.data.data_dir or None,
        ),
        tokenizer,
        seq_len=config.data.seq_len,
        batch_size=config.global_batch_size // mesh.size * len(rows),
        seed=config.data.seed,
        shard_index=rows,
        shard_count=mesh.size,
        cache_dir=config.data.cache_dir or workdir / TOKEN_CACHE_DIR,
    )


def host_rows(mesh: jax.sharding.Mesh) -> list[int]:
    """Which of the `mesh.size` equal row blocks of a global batch this host's devices hold, in
    the order of the global batch (the order `make_array_from_process_local_data` reads a
    host's rows in)."""
    places = batch_sharding(mesh).addressable_devices_indices_map((mesh.size,))
    return sorted(index[0].start or 0 for index in places.values())


def with_maskable(batch: dict[str, np.ndarray], special_ids: np.ndarray) -> dict:
    """The model inputs of a host batch, plus `maskable`: real tokens that are not special."""
    input_ids = np.asarray(batch["input_ids"], np.int32)
    attention_mask = np.asarray(batch["attention_mask"], np.int32)
    maskable = ~np.isin(input_ids, special_ids) & (attention_mask > 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "maskable": maskable}


# ----------------------------------------------------------------------------- the step


def train_step(
    state: dict[str, Any],
    batch: dict[str, jax.Array],
    rest: nnx.State,
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    mask_token_id: int,
    vocab_size: int,
    mask_rate: float,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One AdamW step on a batch's MLM loss (the head scoring the predicted positions only:
    `predicted_loss`); masking and dropout keys come from (rng, step)."""
    mask_key, dropout_key = objectives.step_keys(state, 2)
    inputs, labels, weights = mask_tokens(
        mask_key, batch["input_ids"], batch["maskable"], mask_token_id, vocab_size, mask_rate
    )
    model = objectives.training_model(graphdef, state["params"], rest, dropout_key)

    capacity = prediction_capacity(inputs.shape[1], mask_rate)

    def loss_fn(model: nnx.Module) -> tuple[jax.Array, dict]:
        hidden = model.bert(inputs, batch["attention_mask"], None)
        return predicted_loss(model, hidden, labels, weights, capacity)

    (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    new_state, grad_norm = objectives.optimizer_step(state, grads, optimizer)
    return new_state, {**metrics, "grad_norm": grad_norm}


def objective(
    config: ml_collections.ConfigDict, workdir: Path, optimizer: optax.GradientTransformation
) -> objectives.Objective:
    """MLM pre-training of the config's BERT on its corpora (the tokenizer trained and cached in
    `workdir` on first use)."""
    tokenizer = load_tokenizer(config, workdir)
    vocab_size = len(tokenizer)
    special_ids = np.asarray([tokenizer.pad_token_id, *tokenizer.all_special_ids], np.int32)
    build = partial(build_model, config, vocab_size)
    graphdef, rest = objectives.split_model(build)
    step = partial(
        train_step,
        graphdef=graphdef,
        optimizer=optimizer,
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=vocab_size,
        mask_rate=config.mask_rate,
    )

    def init_state() -> dict[str, Any]:
        params = nnx.state(build(), nnx.Param).to_pure_dict()
        return objectives.init_train_state(params, optimizer, config.seed)

    return objectives.Objective(
        init_state=init_state,
        step=step,
        rest=rest,
        dataset=training_dataset(config, tokenizer, workdir),
        host_batch=partial(with_maskable, special_ids=special_ids),
        quality=None,
    )
