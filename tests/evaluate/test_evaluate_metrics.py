"""Host-side metrics: Spearman, accuracy, F1, SQuAD normalisation and scores, best span."""

import numpy as np
import pytest
from scipy import stats

from es_jax.evaluate import metrics


def test_spearman_matches_scipy_times_100():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    expected = 100 * stats.spearmanr(a, b).statistic
    assert metrics.spearman_x100(a, b) == pytest.approx(expected)


def test_spearman_of_monotone_map_is_100():
    a = np.linspace(0, 1, 20)
    assert metrics.spearman_x100(a, np.exp(a)) == pytest.approx(100.0)


def test_spearman_of_constant_predictions_is_nan():
    assert np.isnan(metrics.spearman_x100(np.ones(5), np.arange(5.0)))


def test_spearman_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="equal length"):
        metrics.spearman_x100(np.ones(3), np.ones(4))


def test_upper_triangle_of_50_by_50_has_1225_pairs_in_row_order():
    matrix = np.arange(50 * 50).reshape(50, 50)
    pairs = metrics.upper_triangle(matrix)
    assert pairs.shape == (1225,)
    assert pairs[:3].tolist() == [1, 2, 3]
    assert pairs[49] == matrix[1, 2]


def test_accuracy_and_f1():
    predictions = np.array([1, 0, 1, 1, 0])
    labels = np.array([1, 0, 0, 1, 1])
    assert metrics.accuracy_x100(predictions, labels) == pytest.approx(60.0)
    # precision 2/3, recall 2/3
    assert metrics.binary_f1_x100(predictions, labels) == pytest.approx(100 * 2 / 3)


def test_accuracy_of_nothing_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        metrics.accuracy_x100(np.array([]), np.array([]))


def test_squad_normalisation_drops_case_punctuation_and_articles():
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"


def test_squad_scores_take_the_best_true_answer():
    scores = metrics.squad_scores(
        ["the Eiffel Tower", "Paris France"], [["Eiffel Tower", "tower"], ["Paris"]]
    )
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1.0 + 2 / 3) / 2)


def test_best_span_stays_in_context_and_respects_max_length():
    start = np.array([9.0, 1.0, 0.0, 0.0, 0.0])
    end = np.array([0.0, 0.0, 0.0, 5.0, 9.0])
    context = np.array([0, 1, 1, 1, 1])
    assert metrics.best_span(start, end, context, max_length=30)[:2] == (1, 4)
    assert metrics.best_span(start, end, context, max_length=3)[:2] == (2, 4)
