"""Host-side metrics on small arrays: Spearman x 100, accuracy, F1, SQuAD exact match and F1.

The heavy part of every evaluation (the model's forward pass) is jitted in `evaluators.py`; what is
left here runs once per level on a few thousand numbers or strings.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np
from scipy import stats


def spearman_x100(predicted: np.ndarray, human: np.ndarray) -> float:
    """Spearman's rank correlation times 100 (NaN when either side is constant)."""
    predicted = np.asarray(predicted, dtype=np.float64)
    human = np.asarray(human, dtype=np.float64)
    if predicted.shape != human.shape or predicted.ndim != 1:
        raise ValueError(
            f"predicted and human scores must be 1-D and of equal length, got {predicted.shape} "
            f"and {human.shape}."
        )
    if predicted.size < 2 or np.ptp(predicted) == 0 or np.ptp(human) == 0:
        return float("nan")
    return float(100.0 * stats.spearmanr(predicted, human).statistic)


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    """The strictly upper-triangular entries of a square matrix, row by row (n(n-1)/2 values)."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {matrix.shape}.")
    rows, cols = np.triu_indices(matrix.shape[0], k=1)
    return matrix[rows, cols]


def accuracy_x100(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Percentage of predictions equal to their labels."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.size == 0:
        raise ValueError(
            f"need equally many predictions and labels (at least one), got {predictions.shape} "
            f"and {labels.shape}."
        )
    return float(100.0 * np.mean(predictions == labels))


def binary_f1_x100(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class times 100 (0 when there is no true positive)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    true_positive = np.sum((predictions == positive) & (labels == positive))
    if true_positive == 0:
        return 0.0
    precision = true_positive / np.sum(predictions == positive)
    recall = true_positive / np.sum(labels == positive)
    return float(100.0 * 2 * precision * recall / (precision + recall))


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lower case, no punctuation, articles or extra spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_f1(prediction: str, truth: str) -> float:
    """Token-overlap F1 between a predicted and a true answer, after normalisation (in [0, 1])."""
    predicted_tokens = normalize_answer(prediction).split()
    true_tokens = normalize_answer(truth).split()
    common = collections.Counter(predicted_tokens) & collections.Counter(true_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted_tokens)
    recall = overlap / len(true_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 (x 100), each prediction against its best true answer."""
    if len(predictions) != len(answers) or not predictions:
        raise ValueError(
            f"need one list of true answers per prediction (at least one), got {len(predictions)} "
            f"predictions and {len(answers)} answer lists."
        )
    exact, f1 = [], []
    for prediction, truths in zip(predictions, answers, strict=True):
        exact.append(max(normalize_answer(prediction) == normalize_answer(t) for t in truths))
        f1.append(max(answer_f1(prediction, t) for t in truths))
    return {"exact_match": 100.0 * float(np.mean(exact)), "f1": 100.0 * float(np.mean(f1))}


def best_span(
    start_logits: np.ndarray, end_logits: np.ndarray, context_mask: np.ndarray, max_length: int
) -> tuple[int, int, float]:
    """The (start, end) token span of highest start+end logit inside the context, end >= start."""
    scores = start_logits[:, None] + end_logits[None, :]
    n = scores.shape[0]
    allowed = np.triu(np.ones((n, n), dtype=bool)) & ~np.triu(np.ones((n, n), bool), k=max_length)
    allowed &= context_mask[:, None].astype(bool) & context_mask[None, :].astype(bool)
    if not allowed.any():
        return 0, 0, float("-inf")
    scores = np.where(allowed, scores, -np.inf)
    start, end = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return int(start), int(end), float(scores[start, end])
