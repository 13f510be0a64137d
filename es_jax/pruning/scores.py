"""Importance scores: magnitude, seeded random, and activation-aware Wanda (|W| times input norms).

A scores tree has the structure of the parameters, with a float array on each target leaf and
`None` elsewhere. Lower scores are pruned first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from es_jax.pruning.paths import PyTree, Selector, flatten, target_flags

Array = jax.Array


@jax.jit
def _finite_flags(leaves: list[Array]) -> Array:
    """Whether each leaf is free of NaN and inf."""
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def check_finite(paths: list[str], leaves: list[Any]) -> None:
    """Refuses NaN or inf in target leaves (skipped under tracing, where values are unknown)."""
    if not leaves or any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return
    flags = jax.device_get(_finite_flags(list(leaves)))
    for path, finite in zip(paths, flags, strict=True):
        if not finite:
            raise ValueError(f"leaf {path!r} contains NaN or inf; scores of non-finite weights are "
                             f"meaningless: fix or exclude the leaf before pruning")


def map_targets(params: PyTree, where: Selector | None,
                score: Callable[[int, str, Array], Array]) -> PyTree:
    """Applies `score(index, path, leaf)` to each target leaf; `None` on the others."""
    paths, leaves, treedef = flatten(params)
    flags = target_flags(paths, leaves, where)
    check_finite([p for p, f in zip(paths, flags, strict=True) if f],
                 [leaf for leaf, f in zip(leaves, flags, strict=True) if f])
    out = [score(i, path, jnp.asarray(leaf)) if flag else None
           for i, (path, leaf, flag) in enumerate(zip(paths, leaves, flags, strict=True))]
    return jax.tree_util.tree_unflatten(treedef, out)


def magnitude(params: PyTree, where: Selector | None = None) -> PyTree:
    """|w| on every target leaf."""
    return map_targets(params, where, lambda _, __, leaf: jnp.abs(leaf))


def random_scores(params: PyTree, key: Array, where: Selector | None = None) -> PyTree:
    """Uniform random scores in [0, 1), one independent stream per leaf, reproducible from `key`."""
    return map_targets(params, where, lambda i, _, leaf: jax.random.uniform(
        jax.random.fold_in(key, i), leaf.shape, jnp.float32))


def wanda(params: PyTree, input_norms: Mapping[str, Array], where: Selector | None = None,
          axis: int = 0) -> PyTree:
    """|W| scaled by the L2 norm of each input feature (Wanda); `axis` is the kernel's input axis.

    `input_norms` maps each target leaf's path to a vector as long as that axis (for a Flax
    `(in, out)` kernel, the `in` features).
    """
    def score(_: int, path: str, leaf: Array) -> Array:
        if path not in input_norms:
            raise ValueError(f"no input norms for target leaf {path!r}; collect activation norms "
                             f"for every target (models.activation_norms) or narrow the selector")
        norms = jnp.asarray(input_norms[path])
        if norms.shape != (leaf.shape[axis],):
            raise ValueError(f"input norms for {path!r} have shape {norms.shape}, expected "
                             f"({leaf.shape[axis]},) to match axis {axis} of shape {leaf.shape}")
        shape = [1] * leaf.ndim
        shape[axis] = -1
        return jnp.abs(leaf).astype(jnp.float32) * norms.astype(jnp.float32).reshape(shape)

    return map_targets(params, where, score)
