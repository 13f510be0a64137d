"""Essential sparsity and the knee of a drop-versus-sparsity curve.

The paper's rule (Jaiswal et al. 2023, section 3): the essential sparsity of a model on a task is
the largest sparsity on the grid such that every level up to it stays within epsilon of the dense
model. A "drop" here is always how much worse a level is than dense, in the metric's own units, so
a positive drop means worse whether the metric is higher-is-better (accuracy, Spearman) or
lower-is-better (perplexity, loss). Epsilon is absolute (points of accuracy/F1/correlation) or
relative to the dense value (perplexity and loss).

Fine-tuned levels repeated over seeds are judged on their seed means by the paper's rule, and
also by a noise-aware rule: a level only counts as a drop when it exceeds both epsilon and the
seed spread, sqrt(std_dense^2 + std_level^2) (`beyond_noise`, `noise_aware_essential_sparsity`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

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
    return _last_within(s, d, np.full(s.shape, tolerance))


def noise_aware_essential_sparsity(
    sparsities: Sequence[float],
    drops: Sequence[float],
    tolerance: float,
    noises: Sequence[float],
) -> float:
    """Largest grid sparsity such that no level up to it is `beyond_noise` (0.0 if none): every
    level's drop is within epsilon or within its seed spread `noises[i]`. Equal to
    `essential_sparsity` when every noise is 0; a NaN drop counts as beyond."""
    s, d = _checked_curve(sparsities, drops)
    order = np.argsort(np.asarray(sparsities, dtype=np.float64), kind="stable")
    n = np.asarray(noises, dtype=np.float64)
    if n.shape != order.shape:
        raise ValueError(f"noises must give one value per level, got {n.shape} for {s.shape}.")
    return _last_within(s, d, np.maximum(tolerance, n[order]))


def _last_within(s: np.ndarray, d: np.ndarray, allowed: np.ndarray) -> float:
    """The last sparsity of the sorted curve before the first drop that is not <= its allowance."""
    essential = 0.0
    for sparsity, level_drop, limit in zip(s, d, allowed, strict=True):
        if not level_drop <= limit:  # NaN-safe: NaN fails the test
            break
        essential = float(sparsity)
    return essential


class Spread(NamedTuple):
    """A level's per-seed values summarised: their mean and sample standard deviation."""

    mean: float
    std: float


def seed_spread(values: Sequence[float]) -> Spread:
    """Mean and sample standard deviation (ddof=1; 0.0 for one value) of per-seed values."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or not v.size:
        raise ValueError(f"seed values must be a non-empty 1-D list, got shape {v.shape}.")
    return Spread(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0)


def seed_noise(dense_std: float, level_std: float) -> float:
    """The spread a level's drop must exceed to count: sqrt(dense_std^2 + level_std^2), the
    standard deviation of the difference of two independent seed values."""
    return math.hypot(dense_std, level_std)


def beyond_noise(level_drop: float, tolerance: float, noise: float) -> bool:
    """True when the drop exceeds both epsilon (`tolerance`) and the seed spread `noise`; a NaN
    drop counts as beyond."""
    return not level_drop <= max(tolerance, noise)


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
