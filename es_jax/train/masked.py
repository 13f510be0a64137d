"""An optax wrapper that keeps pruned weights exactly zero and their optimizer moments zero.

`keep_pruned_zero(inner, mask)` zeroes the gradients of pruned entries before `inner` sees them
(so Adam's first and second moments of those entries stay exactly zero), then replaces their
updates by `-param`, so a pruned weight is exactly zero after every step, whatever `inner` adds
(weight decay included), even if it was not zero before. The mask lives in the optimizer state,
so one compiled update serves every mask of the same structure (every level of a sweep).

A mask is a bool pytree with the structure of the parameters, True = kept, None where a leaf is
not a pruning target (such leaves train normally); `nnx.State` parameters work as well.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class KeepPrunedZeroState(NamedTuple):
    """The wrapped optimizer's state and the mask in force."""

    inner_state: optax.OptState
    mask: PyTree


def _is_none(x: Any) -> bool:
    """True for the `None` leaves that mark non-targets in a mask."""
    return x is None


def map_masked(fn: Callable[..., jax.Array], mask: PyTree, *trees: PyTree) -> PyTree:
    """`fn(mask_leaf, *leaves)` on masked leaves; the first tree's leaf where the mask is None."""
    return jax.tree.map(
        lambda m, first, *rest: first if m is None else fn(m, first, *rest),
        mask,
        *trees,
        is_leaf=_is_none,
    )


def mask_problem(mask_leaf: Any, param: jax.Array) -> str | None:
    """What is wrong with one mask leaf for its parameter, or None when it fits."""
    shape = getattr(mask_leaf, "shape", None)
    if shape != param.shape:
        return f"shape {shape} differs from the parameter's {param.shape}"
    if mask_leaf.dtype != jnp.bool_:
        return f"dtype {mask_leaf.dtype} is not bool (True = kept)"
    return None


def check_mask(mask: PyTree, params: PyTree) -> None:
    """Refuse a mask whose structure, shapes or dtypes do not fit the parameters."""
    try:
        problems = jax.tree.map(
            lambda m, p: None if m is None else mask_problem(m, p), mask, params, is_leaf=_is_none
        )
    except ValueError as error:
        raise ValueError(
            "mask does not have the structure of the parameters (build it from the same "
            f"params, with None on non-target leaves): {error}"
        ) from error
    for path, problem in jax.tree_util.tree_flatten_with_path(problems)[0]:
        raise ValueError(f"mask leaf {jax.tree_util.keystr(path)}: {problem}")


def keep_pruned_zero(
    inner: optax.GradientTransformation, mask: PyTree
) -> optax.GradientTransformation:
    """Wrap `inner` so entries where `mask` is False stay exactly zero, moments included."""

    def init_fn(params: PyTree) -> KeepPrunedZeroState:
        """The inner state, and the mask checked against the parameters."""
        check_mask(mask, params)
        return KeepPrunedZeroState(inner.init(params), mask)

    def update_fn(
        updates: PyTree, state: KeepPrunedZeroState, params: PyTree | None = None
    ) -> tuple[PyTree, KeepPrunedZeroState]:
        """Masked gradients through `inner`; pruned updates set to `-param`."""
        if params is None:
            raise ValueError("keep_pruned_zero needs params in update(grads, state, params)")
        grads = map_masked(lambda m, g: jnp.where(m, g, jnp.zeros_like(g)), state.mask, updates)
        inner_updates, inner_state = inner.update(grads, state.inner_state, params)
        kept_updates = map_masked(
            lambda m, u, p: jnp.where(m, u, -p.astype(u.dtype)), state.mask, inner_updates, params
        )
        return kept_updates, KeepPrunedZeroState(inner_state, state.mask)

    return optax.GradientTransformation(init_fn, update_fn)
