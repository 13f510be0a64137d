"""Masks from scores: global and layer-wise unstructured, nested levels, N:M, ERK; and `apply`.

A mask is a bool pytree with the structure of the parameters: True where a weight is kept, `None`
on leaves that are not targets. `filled_mask` and `target_leaf_flags` recast it for code that
cannot take `None` leaves (a plain `jax.tree.map`, `optax.masked`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from es_jax.pruning.paths import PyTree, Selector, check_like, path_string
from es_jax.pruning.scores import map_targets, random_scores
from es_jax.pruning.select import kept_masks, sortable_keys

Array = jax.Array
Sparsity = float | Sequence[float]


def _is_none(x: Any) -> bool:
    """Whether a scores/mask entry marks a non-target leaf."""
    return x is None


def _score_leaves(scores: PyTree) -> tuple[list[str], list[Any], Any]:
    """Paths, leaves (None off target) and treedef of a scores tree; refuses one with no targets."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(scores, is_leaf=_is_none)
    paths = [path_string(p) for p, _ in with_paths]
    leaves = [leaf for _, leaf in with_paths]
    if all(leaf is None for leaf in leaves):
        raise ValueError("the scores have no target leaf (every leaf is None)")
    return paths, leaves, treedef


def _levels(sparsity: Sparsity) -> tuple[list[float], bool]:
    """The sparsity levels as a list, and whether a single level was given."""
    single = isinstance(sparsity, int | float | np.floating | np.integer)
    levels = [float(sparsity)] if single else [float(s) for s in sparsity]
    for level in levels:
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"sparsity {level} is outside [0, 1]")
    return levels, single


def _assemble(treedef: Any, leaves: list[Any], targets: list[int], kept: list[Array]) -> PyTree:
    """A mask tree: the kept arrays on target positions, None elsewhere."""
    out: list[Any] = [None] * len(leaves)
    for position, mask in zip(targets, kept, strict=True):
        out[position] = mask
    return jax.tree_util.tree_unflatten(treedef, out)


def unstructured(scores: PyTree, sparsity: Sparsity,
                 scope: Literal["global", "layerwise"] = "global",
                 transform: Callable[[Array], Array] | None = None) -> PyTree | list[PyTree]:
    """Removes the lowest scores: exactly round(s * n) of the n target weights (global) or per leaf.

    A list of sparsities gives a list of nested masks from one selection. With `transform` (an
    elementwise function, e.g. `jnp.abs` on a tree of the target weights) the scores are
    `transform(leaf)`, computed inside the selection instead of stored: the same masks as
    `unstructured(jax.tree.map(transform, scores), ...)`, with one pass and 4 bytes/weight less.
    """
    levels, single = _levels(sparsity)
    _, leaves, treedef = _score_leaves(scores)
    targets = [i for i, leaf in enumerate(leaves) if leaf is not None]
    arrays = [jnp.asarray(leaves[i]) for i in targets]
    ascending = sorted(levels)
    if scope == "global":
        total = sum(a.size for a in arrays)
        per_level = kept_masks(arrays, [round(s * total) for s in ascending], transform)
    elif scope == "layerwise":
        per_leaf = [kept_masks([a], [round(s * a.size) for s in ascending], transform)
                    for a in arrays]
        per_level = [[leaf_levels[level][0] for leaf_levels in per_leaf]
                     for level in range(len(levels))]
    else:
        raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")
    by_level = dict(zip(ascending, per_level, strict=True))
    masks = [_assemble(treedef, leaves, targets, by_level[s]) for s in levels]
    return masks[0] if single else masks


def _group_kept(groups: Array, n: int) -> Array:
    """Kept flags keeping the n largest of each group along the last axis (ties: lower index)."""
    keys = sortable_keys(groups)
    m = groups.shape[-1]
    if m <= 16:
        larger = keys[..., None, :] > keys[..., :, None]
        index = jnp.arange(m)
        earlier_tie = (keys[..., None, :] == keys[..., :, None]) & (index[None, :] < index[:, None])
        rank = jnp.sum(larger | earlier_tie, axis=-1)
    else:
        order = jnp.argsort(keys, axis=-1, stable=True, descending=True)
        rank = jnp.argsort(order, axis=-1, stable=True)
    return rank < n


def n_of_m(scores: PyTree, n: int, m: int, axis: int = 0) -> PyTree:
    """Keeps the n highest scores of every m consecutive weights along `axis` (Flax input: 0)."""
    if m < 1 or not 0 <= n <= m:
        raise ValueError(f"N:M needs 0 <= n <= m and m >= 1, got n={n}, m={m}")
    paths, leaves, treedef = _score_leaves(scores)
    out: list[Any] = []
    for path, leaf in zip(paths, leaves, strict=True):
        if leaf is None:
            out.append(None)
            continue
        leaf = jnp.asarray(leaf)
        if leaf.ndim == 0 or not -leaf.ndim <= axis < leaf.ndim:
            raise ValueError(f"leaf {path!r} of shape {leaf.shape} has no axis {axis} for N:M")
        if leaf.shape[axis] % m:
            raise ValueError(f"leaf {path!r}: axis {axis} has length {leaf.shape[axis]}, not "
                             f"divisible by m={m}; choose another axis or exclude the leaf")
        moved = jnp.moveaxis(leaf, axis, -1)
        groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
        kept = _group_kept(groups, n).reshape(moved.shape)
        out.append(jnp.moveaxis(kept, -1, axis))
    return jax.tree_util.tree_unflatten(treedef, out)


def erk_densities(shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[float]:
    """Erdos-Renyi-kernel densities: proportional to sum(dims)/prod(dims), capped at 1."""
    sizes = np.array([np.prod(s) for s in shapes], dtype=np.float64)
    raw = np.array([np.sum(s) / np.prod(s) for s in shapes], dtype=np.float64)
    budget = (1.0 - sparsity) * sizes.sum()
    dense = np.zeros(len(shapes), bool)
    while True:
        scale = (budget - sizes[dense].sum()) / max(np.sum(raw[~dense] * sizes[~dense]), 1e-30)
        over = ~dense & (scale * raw > 1.0)
        if not over.any():
            return [1.0 if d else float(min(1.0, scale * r))
                    for d, r in zip(dense, raw, strict=True)]
        dense |= over


def erk(params: PyTree, sparsity: float, key: Array, where: Selector | None = None) -> PyTree:
    """A random mask whose per-leaf densities follow the ERK allocation for total `sparsity`."""
    _levels(sparsity)
    scores = random_scores(params, key, where)
    _, leaves, treedef = _score_leaves(scores)
    targets = [i for i, leaf in enumerate(leaves) if leaf is not None]
    densities = erk_densities([leaves[i].shape for i in targets], sparsity)
    kept = [kept_masks([leaves[i]], [round((1 - d) * leaves[i].size)])[0][0]
            for i, d in zip(targets, densities, strict=True)]
    return _assemble(treedef, leaves, targets, kept)


def apply(params: PyTree, mask: PyTree) -> PyTree:
    """Zeroes the pruned weights; leaves where the mask is None are returned unchanged."""
    _, leaves, aligned = check_like(params, mask, "mask")
    treedef = jax.tree_util.tree_structure(params)
    out = [leaf if keep is None else jnp.where(keep, leaf, jnp.zeros((), jnp.asarray(leaf).dtype))
           for leaf, keep in zip(leaves, aligned, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def filled_mask(mask: PyTree, params: PyTree) -> PyTree:
    """The mask with every None leaf replaced by an all-True bool array of the parameter's shape.

    Every leaf is then an array, so the mask pairs with the parameters in a plain `jax.tree.map`
    (no `is_leaf`): with `filled = filled_mask(mask, params)`,
    `jax.tree.map(lambda p, m: jnp.where(m, p, 0), params, filled)` equals `apply(params, mask)`.
    The mask's array leaves are returned as they are; a filled leaf is
    `jnp.ones_like(param, dtype=bool)`, which called eagerly has the parameter's sharding (inside
    jit, the compiler places it).
    """
    _, leaves, aligned = check_like(params, mask, "mask")
    treedef = jax.tree_util.tree_structure(params)
    out = [jnp.ones_like(leaf, dtype=jnp.bool_) if keep is None else keep
           for leaf, keep in zip(leaves, aligned, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def target_leaf_flags(mask: PyTree) -> PyTree:
    """A tree of Python bools with the mask's structure: True on target leaves, False on None ones.

    The per-leaf mask that `optax.masked(inner, target_leaf_flags(mask))` takes: `inner` then
    sees and transforms the target leaves only, and the other leaves' updates pass unchanged.
    """
    return jax.tree.map(lambda keep: keep is not None, mask, is_leaf=_is_none)


def omp(params: PyTree, sparsity: Sparsity, where: Selector | None = None,
        scope: Literal["global", "layerwise"] = "global") -> tuple[Any, Any]:
    """One-shot magnitude pruning: (pruned params, mask), or lists of both for a list of levels.

    The same masks as `unstructured(magnitude(params, where), ...)`, with |w| computed inside the
    selection instead of stored.
    """
    targets = map_targets(params, where, lambda _, __, leaf: leaf)
    masks = unstructured(targets, sparsity, scope=scope, transform=jnp.abs)
    if isinstance(masks, list):
        return [apply(params, m) for m in masks], masks
    return apply(params, masks), masks
