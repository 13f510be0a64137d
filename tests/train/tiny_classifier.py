"""A tiny BERT sequence classifier and batches of a task it learns in a few steps, shared by the
IMP and mesh tests (import it as `tiny_classifier`: this folder is on the path of its tests and
of test_train_lottery.py run as a script)."""

from collections.abc import Callable

import numpy as np
from flax import nnx

from es_jax.models import bert


def classifier(config: bert.BertConfig) -> Callable[[nnx.Rngs], nnx.Module]:
    """`model_fn(rngs)`: a 2-label BertForSequenceClassification of `config` (stands in for
    pre-trained weights plus a new head)."""

    def model_fn(rngs: nnx.Rngs) -> nnx.Module:
        return bert.BertForSequenceClassification(config, num_labels=2, rngs=rngs)

    return model_fn


def learnable_batch(seed: int, size: int, vocab_size: int, seq_len: int) -> dict[str, np.ndarray]:
    """A batch of a learnable task: label 1 sequences draw from the upper half of the
    vocabulary, label 0 ones from the lower half."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size).astype(np.int32)
    half = vocab_size // 2
    ids = rng.integers(1, half, (size, seq_len)) + half * labels[:, None]
    return {"input_ids": ids.astype(np.int32), "attention_mask": np.ones((size, seq_len), np.int32),
            "label": labels}
