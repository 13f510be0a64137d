"""DINO's weighted k-nearest-neighbour classifier over frozen features (Caron et al. 2021, Wu et
al. 2018): how self-supervised and supervised backbones are compared without training a head.

Features are L2-normalised; each test row's k most cosine-similar training rows vote for their
labels with weight exp(similarity / temperature), and the class with the largest summed weight is
predicted. Test rows go through one jitted function in fixed-size chunks, so memory is bounded by
chunk x number of training rows whatever the test set's size, and the function compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from es_jax.evaluate import metrics


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Percentage (x 100) of test rows whose `knn_predict` label equals their `test_labels`."""
    predictions = knn_predict(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        chunk=chunk,
    )
    return metrics.accuracy_x100(predictions, np.asarray(test_labels))


def knn_predict(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """Predicted labels (N_test,) int32 of test rows (N_test, D) from training rows (N, D) with
    labels (N,) in [0, num_classes).

    Every row is divided by max(||row||, 1e-12); a test row's neighbours are the k training rows of
    largest cosine similarity s (equal similarities: the earlier training row first), each adding
    exp(s / temperature) to its label's vote; the label of largest vote wins (equal votes: the
    smallest label). Computed in float32, `chunk` test rows per jitted call.
    """
    train, labels, test = _checked_inputs(
        train_features, train_labels, test_features, num_classes, k, temperature, chunk
    )
    if test.shape[0] == 0:
        return np.zeros((0,), np.int32)
    rows = min(chunk, test.shape[0])
    padded = np.pad(test, ((0, -test.shape[0] % rows), (0, 0)))
    train = _l2_normalize(jnp.asarray(train))
    labels = jnp.asarray(labels)
    predict = functools.partial(
        _predict_chunk, train, labels, temperature=jnp.float32(temperature), k=k,
        num_classes=num_classes,
    )
    chunks = [predict(jnp.asarray(padded[i : i + rows])) for i in range(0, len(padded), rows)]
    return np.concatenate([np.asarray(c) for c in chunks])[: test.shape[0]]


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _predict_chunk(
    train: jax.Array,
    labels: jax.Array,
    test: jax.Array,
    *,
    temperature: jax.Array,
    k: int,
    num_classes: int,
) -> jax.Array:
    """Predicted labels of test rows (C, D) from L2-normalised training rows (N, D)."""
    similarity = jnp.matmul(_l2_normalize(test), train.T, precision=jax.lax.Precision.HIGHEST)
    nearest, indices = jax.lax.top_k(similarity, k)
    weights = jnp.exp(nearest / temperature)
    votes = jnp.sum(jax.nn.one_hot(labels[indices], num_classes) * weights[..., None], axis=1)
    return jnp.argmax(votes, axis=-1).astype(jnp.int32)


@jax.jit
def _l2_normalize(features: jax.Array) -> jax.Array:
    """Rows divided by max(||row||, 1e-12)."""
    norms = jnp.linalg.norm(features, axis=-1, keepdims=True)
    return features / jnp.maximum(norms, 1e-12)


def _checked_inputs(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    num_classes: int,
    k: int,
    temperature: float,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train float32, labels int32, test float32) numpy arrays, or a ValueError naming the bad
    argument."""
    train = np.asarray(train_features, np.float32)
    test = np.asarray(test_features, np.float32)
    labels = np.asarray(train_labels)
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(
            f"train_features and test_features must be (N, D) and (N_test, D); got {train.shape} "
            f"and {test.shape}."
        )
    if labels.shape != train.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"train_labels must be integers of shape ({train.shape[0]},), one per training row; "
            f"got {labels.dtype} {labels.shape}."
        )
    if num_classes < 1 or (labels.size and not 0 <= labels.min() <= labels.max() < num_classes):
        raise ValueError(
            f"train_labels must lie in [0, num_classes={num_classes}); got labels in "
            f"[{labels.min(initial=0)}, {labels.max(initial=0)}]. Pass the dataset's class count."
        )
    if not 1 <= k <= train.shape[0]:
        raise ValueError(
            f"k={k} must be between 1 and the number of training rows ({train.shape[0]}); "
            "lower k or pass more training features."
        )
    if not temperature > 0 or chunk < 1:
        raise ValueError(
            f"temperature must be positive and chunk at least 1; got temperature={temperature}, "
            f"chunk={chunk}."
        )
    return train, labels.astype(np.int32), test
