"""Importance scores: magnitude, seeded random, and activation-aware Wanda (|W| times input norms).

A scores tree has the structure of the parameters, with a float array on each target leaf and
`None` elsewhere. Lower scores are pruned first. NaN or inf in the weights (or norms) of a target
leaf is refused when called eagerly; under jit it gives non-finite scores, which the selection
removes first (see `masks`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from es_jax.pruning.paths import PyTree, Selector, flatten, leaf_paths, target_flags
from es_jax.pruning.select import SMALL_SCORES

Array = jax.Array


@functools.partial(jax.jit, static_argnames="transform")
def _finite_flags(leaves: list[Array], transform: Callable[[Array], Array] | None = None) -> Array:
    """Whether each leaf, or `transform(leaf)`, is free of NaN and inf.

    The sum of the entries times 0 is 0 if they are finite and NaN if not (inf * 0 is NaN, as
    IEEE arithmetic has it and XLA keeps it without fast-math): one float reduction, about one
    pass over the leaf, where XLA:CPU takes about 7x as long for `all(isfinite(x))`. Small leaves
    (up to SMALL_SCORES entries) of one size and dtype are summed as the rows of one array, so
    that the program grows little with the number of leaves.
    """
    groups: dict[tuple, list[int]] = {}
    for i, leaf in enumerate(leaves):
        group = (leaf.size, leaf.dtype) if leaf.size <= SMALL_SCORES else (i,)
        groups.setdefault(group, []).append(i)
    flags = []
    for members in groups.values():
        rows = lax.concatenate([leaves[i].reshape(1, leaves[i].size) for i in members], 0)
        values = rows if transform is None else transform(rows)
        flags.append(jnp.isfinite(jnp.sum(values * 0, axis=1, dtype=jnp.float32)))
    order = np.argsort(np.concatenate(list(groups.values())))  # back to the leaves' order
    return jnp.concatenate(flags)[order]


def weights_message(path: str) -> str:
    """The error for NaN or inf in the weights of a target leaf."""
    return (f"leaf {path!r} contains NaN or inf; scores of non-finite weights are meaningless: "
            f"fix or exclude the leaf before pruning")


def scores_message(path: str) -> str:
    """The error for NaN or inf in the scores of a target leaf."""
    return (f"leaf {path!r} contains NaN or inf scores, which have no rank: fix the scores (or "
            f"the weights or input norms they come from) or exclude the leaf")


def norms_message(path: str) -> str:
    """The error for NaN or inf in the input norms of a target leaf (Wanda)."""
    return (f"input norms for leaf {path!r} contain NaN or inf: collect them again on finite "
            f"activations (models.activation_norms) or exclude the leaf")


def check_finite(paths: list[str], leaves: list[Any], message: Callable[[str], str],
                 checked: bool = False, transform: Callable[[Array], Array] | None = None) -> None:
    """Refuses NaN or inf in `leaves` (or in `transform(leaf)`) with `message(path)`.

    Concrete leaves: a ValueError for the first non-finite leaf. Traced leaves (under jit, whose
    values are unknown when tracing): no check, or with `checked` one `checkify.check` a leaf,
    which `jax.experimental.checkify.checkify` turns into an error value (jit refuses to stage a
    check that is not inside `checkify.checkify`).
    """
    if not leaves or (not checked and any(isinstance(x, jax.core.Tracer) for x in leaves)):
        return
    flags = _finite_flags([jnp.asarray(leaf) for leaf in leaves], transform)
    if isinstance(flags, jax.core.Tracer):  # traced leaves, or concrete ones inside a trace
        if checked:
            for path, finite in zip(paths, flags, strict=True):
                # checkify formats its message: braces in a path must stay literal.
                checkify.check(finite, message(path).replace("{", "{{").replace("}", "}}"))
        return
    for path, finite in zip(paths, jax.device_get(flags), strict=True):
        if not finite:
            raise ValueError(message(path))


def map_targets(params: PyTree, where: Selector | None,
                score: Callable[[int, str, Array], Array], checked: bool = False) -> PyTree:
    """Applies `score(index, path, leaf)` to each target leaf; `None` on the others.

    Refuses NaN or inf in a target leaf (see `check_finite`; under jit only if `checked`).
    """
    paths, leaves, treedef = flatten(params)
    flags = target_flags(paths, leaves, where)
    check_finite([p for p, f in zip(paths, flags, strict=True) if f],
                 [leaf for leaf, f in zip(leaves, flags, strict=True) if f],
                 weights_message, checked)
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
    `(in, out)` kernel, the `in` features). Called eagerly, NaN or inf in the norms of a target
    leaf (or in its weights) is a ValueError naming the leaf; under jit, such norms give
    non-finite scores, which the selection removes first (see `masks.unstructured`).
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

    scores = map_targets(params, where, score)
    targets = leaf_paths(scores)  # None leaves have no path: the targets'
    check_finite(targets, [input_norms[path] for path in targets], norms_message)
    return scores
