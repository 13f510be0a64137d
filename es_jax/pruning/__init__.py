"""Pure pruning transforms over parameter pytrees: selectors, scores, exact masks, statistics.

Imports only jax and numpy, so it can be taken alone into any Flax codebase:

    scores = pruning.magnitude(params, where=r".*/(query|key|value)/kernel")
    mask = pruning.unstructured(scores, 0.5)      # exactly round(0.5 * n) removed, globally
    lv = pruning.levels(scores, [0.1, 0.3, 0.5])  # every nested level in one uint8 per weight
    mask = pruning.mask_at(lv, 2)                 # == pruning.unstructured(scores, [...])[2]
    pruned = pruning.apply(params, mask)
    result = pruning.sparsegpt(kernel, hessian, 0.5)   # one layer, OBS error compensation
"""

from es_jax.pruning.masks import (
    apply,
    erk,
    erk_densities,
    erk_kept_counts,
    filled_mask,
    levels,
    mask_at,
    n_of_m,
    omp,
    target_leaf_flags,
    unstructured,
)
from es_jax.pruning.paths import leaf_paths, select
from es_jax.pruning.scores import magnitude, random_scores, wanda
from es_jax.pruning.sparsegpt import Reconstruction, reconstruction_error, sparsegpt
from es_jax.pruning.stats import format_report, near_zero, report, similarity

__all__ = [
    "Reconstruction",
    "apply",
    "erk",
    "erk_densities",
    "erk_kept_counts",
    "filled_mask",
    "format_report",
    "leaf_paths",
    "levels",
    "magnitude",
    "mask_at",
    "n_of_m",
    "near_zero",
    "omp",
    "random_scores",
    "reconstruction_error",
    "report",
    "select",
    "similarity",
    "sparsegpt",
    "target_leaf_flags",
    "unstructured",
    "wanda",
]
