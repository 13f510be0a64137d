"""An optax wrapper that trains a fixed sparse mask: pruned weights stay exactly zero.

`keep_pruned_zero(inner, mask)` sets the gradients of pruned entries to 0 before `inner` sees
them (so the moments of an Adam in `inner` stay exactly 0 there, unless `inner` adds noise
before it) and sets the updates it returns on pruned entries to exactly 0, whatever `inner`
produced there (weight decay, noise). The pruned weights themselves are zeroed once, before
training, by `pruning.apply(params, mask)` (`omp` returns them so); `init` refuses pruned
weights that are not zero.

Why zero updates and not `-param` (which would zero a weight in one step): a link of an optax
chain cannot see or undo what later links do, and later links scale, clip or add to the updates
they get, so `-param` reaches the weight scaled, clipped or with `decay * param` added, and the
weight is not zeroed. A pruned weight that starts at zero, with a zero update, stays exactly
zero whatever is chained after the wrapper, as long as every later link maps a zero update at a
zero weight to zero: `scale`, `scale_by_learning_rate` and schedules, `clip`,
`clip_by_global_norm`, `add_decayed_weights`, `trace` and the Adam family do; `add_noise` does
not, and belongs inside `inner`, where the zeroed output keeps its noise off the pruned weights
(links after it inside `inner` still see the noise in their state).

The mask lives in the optimizer state, so one compiled update serves every mask of the same
structure (every level of a sweep). A mask is a bool pytree with the structure of the
parameters, True = kept, None where a leaf is not a pruning target (such leaves train normally,
through `inner` alone); `nnx.State` parameters work as well.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from es_jax.pruning.paths import path_string

PyTree = Any


class KeepPrunedZeroState(NamedTuple):
    """The wrapped optimizer's state and the mask in force."""

    inner_state: optax.OptState
    mask: PyTree


def keep_pruned_zero(
    inner: optax.GradientTransformation, mask: PyTree
) -> optax.GradientTransformation:
    """Wrap `inner` to train only the kept entries of `mask`; pruned entries get exactly 0.

    The exact rule, leaf by leaf where the mask is an array (other leaves go through `inner`
    alone): `inner` gets `where(mask, grads, 0)`, and the wrapper returns
    `where(mask, inner_updates, 0)`. `init(params)` refuses a mask that does not fit `params`, and
    params whose pruned entries are not all zero (start from `pruning.apply(params, mask)`); it
    can check the values only of concrete arrays: inside jit it cannot, and pruned weights that
    are not zero then keep their values. `update` passes `params` to `inner` and needs them only
    if `inner` does.
    """

    def init_fn(params: PyTree) -> KeepPrunedZeroState:
        """The inner state, and the mask checked against the parameters and their values."""
        check_mask(mask, params)
        check_pruned_zero(mask, params)
        return KeepPrunedZeroState(inner.init(params), mask)

    def update_fn(
        updates: PyTree, state: KeepPrunedZeroState, params: PyTree | None = None
    ) -> tuple[PyTree, KeepPrunedZeroState]:
        """Masked gradients through `inner`; its updates of pruned entries set to exactly 0."""
        grads = map_masked(_zero_pruned, state.mask, updates)
        inner_updates, inner_state = inner.update(grads, state.inner_state, params)
        kept_updates = map_masked(_zero_pruned, state.mask, inner_updates)
        return kept_updates, KeepPrunedZeroState(inner_state, state.mask)

    return optax.GradientTransformation(init_fn, update_fn)


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


def _zero_pruned(mask_leaf: jax.Array, leaf: jax.Array) -> jax.Array:
    """`leaf` where the mask keeps, exactly 0 where it prunes."""
    return jnp.where(mask_leaf, leaf, jnp.zeros((), leaf.dtype))


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
        raise ValueError(f"mask leaf {path_string(path)!r}: {problem}")


def check_pruned_zero(mask: PyTree, params: PyTree) -> None:
    """Refuse params with a nonzero pruned entry; traced params (inside jit) cannot be looked at."""
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(params)):
        return
    nonzero = jax.tree.map(
        lambda m, p: None if m is None else jnp.count_nonzero(jnp.where(m, 0, p)),
        mask,
        params,
        is_leaf=_is_none,
    )
    for path, count in jax.tree_util.tree_flatten_with_path(jax.device_get(nonzero))[0]:
        if count:
            raise ValueError(
                f"mask leaf {path_string(path)!r}: {count} pruned weights are not zero; start "
                "from pruning.apply(params, mask), which zeroes them"
            )
