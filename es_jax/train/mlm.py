"""Masked-language-model objective: BERT's 15% masking with 80/10/10 replacement, and its loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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
