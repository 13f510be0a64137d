"""Analysis of sweeps and checkpoints: essential sparsity, the knee of a curve, plots.

Plotting lives in `es_jax.analysis.plots` (sweep figures) and is imported on demand, so reading a
`results.json` does not pay for matplotlib.
"""

from es_jax.analysis.essential import (
    Epsilon,
    default_epsilon,
    drop,
    essential_sparsity,
    knee,
    refinement_levels,
)

__all__ = [
    "Epsilon",
    "default_epsilon",
    "drop",
    "essential_sparsity",
    "knee",
    "refinement_levels",
]
