"""Essential sparsity and the knee of a drop-versus-sparsity curve.

The paper's rule (Jaiswal et al. 2023, section 3): the essential sparsity of a model on a task is
the largest sparsity on the grid such that every level up to it stays within epsilon of the dense
model. A "drop" here is always how much worse a level is than dense, in the metric's own units, so
a positive drop means worse whether the metric is higher-is-better (accuracy, Spearman) or
lower-is-better (perplexity, loss). Epsilon is absolute (points of accuracy/F1/correlation) or
relative to the dense value (perplexity and loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LOWER_IS_BETTER_METRICS = frozenset({"perplexity", "lm_loss", "mlm_loss", "loss"})


@dataclass(frozen=True)
class Epsilon:
    """How far from dense a level may fall and still count as free: absolute or relative."""

    value: float
    relative: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value) and self.value >= 0):
            raise ValueError(f"epsilon must be a finite number >= 0, got {self.value!r}.")

    def tolerance(self, dense: float) -> float:
        """The largest allowed drop, in the metric's units, for this dense value."""
        return self.value * abs(dense) if self.relative else self.value

    def as_dict(self) -> dict:
        """JSON form: {"value": ..., "relative": ...}."""
        return {"value": self.value, "relative": self.relative}


def default_epsilon(metric: str, absolute: float = 1.0, relative: float = 0.01) -> Epsilon:
    """The paper's epsilon: 1 point for scores in points, 1% relative for perplexity and losses."""
    if metric in LOWER_IS_BETTER_METRICS:
        return Epsilon(relative, relative=True)
    return Epsilon(absolute, relative=False)


def drop(value: float, dense: float, higher_is_better: bool) -> float:
    """How much worse `value` is than `dense`, in the metric's units (positive = worse)."""
    return dense - value if higher_is_better else value - dense


def _checked_curve(sparsities: Sequence[float], drops: Sequence[float]) -> tuple[np.ndarray, ...]:
    """Sparsities and drops as sorted float arrays; ValueError on bad input."""
    s = np.asarray(sparsities, dtype=np.float64)
    d = np.asarray(drops, dtype=np.float64)
    if s.ndim != 1 or s.shape != d.shape:
        raise ValueError(
            f"sparsities and drops must be 1-D and of equal length, got {s.shape} and {d.shape}."
        )
    if s.size and (s.min() < 0 or s.max() > 1):
        raise ValueError(f"sparsities must lie in [0, 1], got {s.tolist()}.")
    order = np.argsort(s, kind="stable")
    return s[order], d[order]


def essential_sparsity(
    sparsities: Sequence[float], drops: Sequence[float], tolerance: float
) -> float:
    """Largest grid sparsity such that every level up to it has drop <= tolerance (0.0 if none).

    A NaN drop (a level whose metric could not be computed, e.g. an overflowing perplexity) counts
    as out of tolerance.
    """
    s, d = _checked_curve(sparsities, drops)
    essential = 0.0
    for sparsity, level_drop in zip(s, d, strict=True):
        if not level_drop <= tolerance:  # NaN-safe: NaN fails the test
            break
        essential = float(sparsity)
    return essential


def knee(sparsities: Sequence[float], drops: Sequence[float], tolerance: float) -> float | None:
    """The knee of a drop curve: the level farthest below the chord from first to last level.

    Both axes are scaled to [0, 1] (the Kneedle construction for a convex, increasing curve), so
    the knee is the last level before the curve turns sharply upwards. None when the curve never
    leaves the tolerance band (no drop to find a knee of) or has fewer than three levels.
    """
    s, d = _checked_curve(sparsities, drops)
    finite = np.isfinite(d)
    s, d = s[finite], d[finite]
    if s.size < 3 or d.max() <= tolerance:
        return None
    x = (s - s[0]) / (s[-1] - s[0])
    y = (d - d.min()) / (d.max() - d.min())
    chord = y[0] + (y[-1] - y[0]) * x
    return float(s[int(np.argmax(chord - y))])


def refinement_levels(sparsities: Sequence[float], essential: float, points: int) -> list[float]:
    """`points` evenly spaced sparsities strictly between `essential` and the next grid level."""
    if points < 0:
        raise ValueError(f"refine must be >= 0 extra levels, got {points}.")
    above = sorted(s for s in sparsities if s > essential)
    if not above or points == 0:
        return []
    upper = above[0]
    step = (upper - essential) / (points + 1)
    return [round(essential + step * (i + 1), 6) for i in range(points)]
