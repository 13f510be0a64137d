"""DINO's weighted k-NN classifier: against a numpy reference, tie-breaking, a separable toy set,
and the errors on bad arguments."""

import numpy as np
import pytest

from es_jax.evaluate import knn


def _numpy_knn(train, labels, test, num_classes, k, temperature):
    """DINO's knn_classifier in float64: cosine similarity, top k (earlier row first on ties),
    exp(s / T) votes per class, largest vote (smallest class on ties)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    similarity = test @ train.T
    predictions = []
    for row in similarity:
        nearest = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(num_classes)
        np.add.at(votes, labels[nearest], np.exp(row[nearest] / temperature))
        predictions.append(np.argmax(votes))
    return np.asarray(predictions)


@pytest.mark.parametrize("chunk", [1, 16, 1024])
def test_predictions_equal_a_numpy_reference(chunk):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 8)).astype(np.float32)
    labels = rng.integers(0, 5, size=300)
    test = rng.normal(size=(50, 8)).astype(np.float32)
    predicted = knn.knn_predict(train, labels, test, num_classes=5, k=20, chunk=chunk)
    assert predicted.shape == (50,)
    expected = _numpy_knn(train.astype(np.float64), labels, test.astype(np.float64), 5, 20, 0.07)
    np.testing.assert_array_equal(predicted, expected)


def test_ties_go_to_the_earlier_row_then_the_smaller_label():
    train = np.asarray([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # rows 0 and 1: same direction
    labels = np.asarray([1, 0, 2])
    test = np.asarray([[3.0, 0.0]])
    assert knn.knn_predict(train, labels, test, num_classes=3, k=1).tolist() == [1]
    assert knn.knn_predict(train, labels, test, num_classes=3, k=2).tolist() == [0]


def test_a_separable_toy_set_is_classified_perfectly():
    rng = np.random.default_rng(1)
    centres = np.eye(3, 6) * 10.0
    train_labels, test_labels = np.repeat(np.arange(3), 20), np.repeat(np.arange(3), 7)
    train = centres[train_labels] + rng.normal(size=(60, 6))
    test = centres[test_labels] + rng.normal(size=(21, 6))
    accuracy = knn.knn_accuracy(train, train_labels, test, test_labels, num_classes=3, k=5)
    assert accuracy == 100.0
    shuffled = knn.knn_accuracy(train, train_labels, test, (test_labels + 1) % 3, num_classes=3)
    assert shuffled == 0.0


def test_an_empty_test_set_gives_no_predictions():
    predicted = knn.knn_predict(np.ones((3, 2)), np.zeros(3, int), np.ones((0, 2)), num_classes=2,
                                k=2)
    assert predicted.shape == (0,)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"k": 4}, r"k=4 must be between 1 and the number of training rows \(3\)"),
        ({"k": 0}, r"k=0"),
        ({"train_labels": np.asarray([0, 1, 2])}, r"\[0, num_classes=2\)"),
        ({"train_labels": np.asarray([0, 1])}, r"train_labels must be integers of shape \(3,\)"),
        ({"train_labels": np.asarray([0.0, 1.0, 1.0])}, r"train_labels must be integers"),
        ({"test_features": np.ones((2, 3))}, r"\(N_test, D\)"),
        ({"temperature": 0.0}, r"temperature must be positive"),
        ({"chunk": 0}, r"chunk at least 1"),
    ],
)
def test_bad_arguments_are_named(changes, match):
    arguments = {
        "train_features": np.ones((3, 2)),
        "train_labels": np.asarray([0, 1, 1]),
        "test_features": np.ones((2, 2)),
        "num_classes": 2,
        "k": 2,
        **changes,
    }
    with pytest.raises(ValueError, match=match):
        knn.knn_predict(**arguments)
