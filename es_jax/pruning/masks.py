"""Masks from scores: global, layer-wise and per-output unstructured, nested levels, N:M, ERK; and
`apply`.

A mask is a bool pytree with the structure of the parameters: True where a weight is kept, `None`
on leaves that are not targets. `filled_mask` and `target_leaf_flags` recast it for code that
cannot take `None` leaves (a plain `jax.tree.map`, `optax.masked`). The masks of increasing
sparsities nest, so `levels` holds them all in one uint8 per weight (the first level that prunes
it), and `mask_at` reads one back.

Non-finite scores. Called eagerly, `unstructured`, `n_of_m` and `omp` refuse NaN or inf in the
scores (or weights) of a target leaf with a ValueError naming the leaf. Under jit, where values
cannot be checked, every non-finite score (NaN, +inf, -inf) ranks below every finite score:
non-finite scores are removed first (tied with each other, so in leaf order, then flat index; in
an N:M group the lower index is kept first), and a non-finite score is never kept while a finite
one is removed. Finite scores keep the exact count and tie order. With `checked=True` the refusal
also runs inside jit, as a `jax.experimental.checkify` check: wrap the caller in
`checkify.checkify` and call `error.throw()` (plain jit refuses to stage such a check).

Compiled programs. Called eagerly, `levels`, `unstructured` and `omp` run one compiled program
for the selection at every level (`_levels_arrays`), and `unstructured`, `omp` and `mask_at` one
small program more for each level's masks (`_kept_at`, `_pruned_at`): each is reused for every
list of sparsities of a length, and its compile time grows little with the number of target
arrays (see `select`). Inside the caller's jit they are part of its one program.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from es_jax.pruning.paths import PyTree, Selector, check_like, path_string
from es_jax.pruning.scores import check_finite, map_targets, random_scores, scores_message
from es_jax.pruning.select import (
    Leaves,
    count_dtype,
    group_rows,
    kept_level_counts,
    kept_masks,
    level_count_dtype,
    sortable_keys,
)

Array = jax.Array
Sparsity = float | Sequence[float]
Rows = tuple[Array, ...] | None  # `select.group_rows`: array positions as program arguments


def _is_none(x: Any) -> bool:
    """Whether a scores/mask entry marks a non-target leaf."""
    return x is None


def _score_leaves(scores: PyTree) -> tuple[list[str], list[Any], Any]:
    """Paths, leaves (arrays; None off target) and treedef of a scores tree; refuses one with no
    targets."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(scores, is_leaf=_is_none)
    paths = [path_string(p) for p, _ in with_paths]
    leaves = [None if leaf is None else jnp.asarray(leaf) for _, leaf in with_paths]
    if all(leaf is None for leaf in leaves):
        raise ValueError("the scores have no target leaf (every leaf is None)")
    return paths, leaves, treedef


def _is_one_level(sparsity: Any) -> bool:
    """Whether `sparsity` is one level (a number, 0-d array or anything not iterable)."""
    return (not hasattr(sparsity, "__iter__") or isinstance(sparsity, str)
            or getattr(sparsity, "ndim", None) == 0)


def is_number(value: Any) -> bool:
    """Whether `value` is a real number: a Python or numpy scalar (not a bool), or a numeric 0-d
    array."""
    if isinstance(value, np.ndarray | jax.Array):
        return value.ndim == 0 and bool(jnp.issubdtype(value.dtype, jnp.number))
    return isinstance(value, numbers.Real | np.generic) and not isinstance(value, bool | np.bool_)


def _level(value: Any) -> float:
    """One sparsity level as a Python float; refuses a traced, non-numeric or out-of-range one."""
    if isinstance(value, jax.core.Tracer):
        raise ValueError("sparsity is traced (an argument of a jitted function), but the number of "
                         "weights to remove, round(s * n), fixes the program: pass a Python float, "
                         "as a static argument (jax.jit(f, static_argnums=...)) or from a closure")
    if not is_number(value):
        raise ValueError(f"a sparsity level is a number in [0, 1] (a float or a 0-d array), "
                         f"got {value!r}")
    level = float(value)
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"sparsity {level} is outside [0, 1]")
    return level


def _levels(sparsity: Sparsity) -> tuple[list[float], bool]:
    """The sparsity levels as Python floats, and whether a single level was given.

    A level is a number or a concrete 0-d array; several are a sequence or a 1-d array. Traced
    levels are refused: the counts to remove fix the shapes of the program.
    """
    if _is_one_level(sparsity):
        return [_level(sparsity)], True
    levels = [_level(level) for level in sparsity]
    if not levels:
        raise ValueError("no sparsity level given (an empty list): give a float or a non-empty "
                         "list of levels")
    return levels, False


Scope = Literal["global", "layerwise", "per_output"]
SCOPES = ("global", "layerwise", "per_output")


def _check_scope(scope: str) -> None:
    """Refuses a scope other than 'global', 'layerwise' and 'per_output'."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def _assemble(treedef: Any, leaves: list[Any], targets: list[int], kept: list[Array]) -> PyTree:
    """A mask tree: the kept arrays on target positions, None elsewhere."""
    out: list[Any] = [None] * len(leaves)
    for position, mask in zip(targets, kept, strict=True):
        out[position] = mask
    return jax.tree_util.tree_unflatten(treedef, out)


def unstructured(scores: PyTree, sparsity: Sparsity, scope: Scope = "global",
                 transform: Callable[[Array], Array] | None = None,
                 checked: bool = False) -> PyTree | list[PyTree]:
    """Removes the lowest scores: exactly round(s * n) of the n target weights (global), of each
    leaf's n (layerwise), or of each output unit's n inputs (per_output).

    Per output (Wanda's comparison group): the last axis of a leaf indexes its outputs (a Flax
    `(in, out)` kernel), and each slice `leaf[..., j]` loses exactly round(s * leaf.size / out) of
    its scores, ties broken by flat position within the slice; a leaf needs at least 2 axes.

    A list of sparsities gives a list of nested masks from one selection. With `transform` (an
    elementwise function, e.g. `jnp.abs` on a tree of the target weights) the scores are
    `transform(leaf)`, computed inside the selection instead of stored: the same masks as
    `unstructured(jax.tree.map(transform, scores), ...)`, with one pass and 4 bytes/weight less.
    NaN or inf scores are refused eagerly, removed first under jit, and refused under
    `checkify.checkify` with `checked=True` (see the module docstring). A zero-size leaf gets an
    empty mask. Sparsities must be concrete (Python floats or 0-d arrays), not traced.
    """
    levels, single = _levels(sparsity)
    _check_scope(scope)
    paths, leaves, treedef = _score_leaves(scores)
    targets = [i for i, leaf in enumerate(leaves) if leaf is not None]
    check_finite([paths[i] for i in targets], [leaves[i] for i in targets], scores_message,
                 checked, transform)
    masks = _unstructured_masks(treedef, leaves, levels, scope, transform, paths)
    return masks[0] if single else masks


def _unstructured_masks(treedef: Any, leaves: list[Any], levels: list[float], scope: Scope,
                        transform: Callable[[Array], Array] | None,
                        paths: Sequence[str]) -> list[PyTree]:
    """One mask tree per level from the target leaves' scores (unchecked): `unstructured`'s body.

    Two compiled programs, each reused across sparsities: the levels of the distinct
    sparsities (`_levels_arrays`), then each level's masks from them (`_kept_at`), so that no
    program writes every level's masks at once (XLA's compile time grows faster than the number
    of arrays a program writes).
    """
    selected = _targets(leaves, levels, scope, paths)
    counts = _levels_arrays(selected.arrays, selected.counts, group_rows(selected.arrays), scope,
                            transform)
    by_level = {s: _assemble(treedef, leaves, selected.positions, _kept_at(counts, np.int32(i)))
                for i, s in enumerate(selected.levels)}
    return [by_level[s] for s in levels]


class Targets(NamedTuple):
    """The target leaves of a selection and what to remove from them."""

    positions: list[int]  # of the target leaves among all leaves
    arrays: list[Array]  # the target leaves
    levels: list[float]  # the distinct sparsities, ascending
    counts: list[Array]  # the weights to remove at each level (see `_removal_counts`)


def _targets(leaves: list[Any], levels: list[float], scope: Scope,
             paths: Sequence[str]) -> Targets:
    """The target leaves (not None) of `leaves` and their removal counts at the distinct
    `levels`; refuses, per output, a target leaf of fewer than 2 axes, naming its path."""
    positions = [i for i, leaf in enumerate(leaves) if leaf is not None]
    arrays = [leaves[i] for i in positions]
    if scope == "per_output":
        for i in positions:
            _check_input_axis(leaves[i], paths[i])
    ascending = sorted(set(levels))
    return Targets(positions, arrays, ascending, _removal_counts(arrays, ascending, scope))


@jax.jit
def _kept_at(counts: list[Array], level: Array) -> list[Array]:
    """The kept masks of one level from the arrays of `_levels_arrays`: `count > level` (the
    level is traced, so one program serves them all)."""
    return [count > level for count in counts]


MAX_LEVELS = 255


def levels(scores: PyTree, sparsities: Sparsity, scope: Scope = "global",
           transform: Callable[[Array], Array] | None = None, checked: bool = False) -> PyTree:
    """Every mask of one nested selection in one byte per weight: on each target leaf a uint8
    array of its shape holding, for each weight, the index in `sparsities` of the first level
    whose mask prunes it, and len(sparsities) where no level does; None on the other leaves.

    `sparsities` must be strictly increasing, at most MAX_LEVELS (255) of them; a single number
    is one level. `mask_at(levels(scores, sparsities, ...), i)` equals `unstructured(scores,
    sparsities, ...)[i]` exactly, ties included: the scopes, `transform`, `checked` and the
    handling of NaN and inf are `unstructured`'s. The masks nest, so a weight's value is the
    number of levels that keep it, counted inside one compiled program (per output, in a loop
    over the levels) that returns the uint8 arrays alone, compiled once per number of levels,
    scope, transform and leaf shapes.
    """
    ascending = _increasing(sparsities)
    _check_scope(scope)
    paths, leaves, treedef = _score_leaves(scores)
    selected = _targets(leaves, ascending, scope, paths)
    check_finite([paths[i] for i in selected.positions], selected.arrays, scores_message, checked,
                 transform)
    counts = _levels_arrays(selected.arrays, selected.counts, group_rows(selected.arrays), scope,
                            transform)
    return _assemble(treedef, leaves, selected.positions, counts)


def _increasing(sparsities: Sparsity) -> list[float]:
    """The sparsity levels as Python floats; refuses levels that do not strictly increase, and
    more than MAX_LEVELS."""
    found, _ = _levels(sparsities)
    if len(found) > MAX_LEVELS:
        raise ValueError(f"{len(found)} sparsity levels, but a uint8 levels array holds at most "
                         f"{MAX_LEVELS}: split them over several calls to pruning.levels")
    for i in range(1, len(found)):
        if found[i] <= found[i - 1]:
            raise ValueError(f"sparsities must be strictly increasing, but level {i} "
                             f"({found[i]}) does not exceed level {i - 1} ({found[i - 1]}): sort "
                             f"them and drop repeats")
    return found


def _removal_counts(arrays: list[Array], levels: list[float], scope: Scope) -> list[Array]:
    """The counts to remove at each ascending level, as `unstructured` rounds them: for 'global'
    one array for all the arrays together, for 'layerwise' one per array, for 'per_output' one
    per array counting within each of its output slices."""
    if scope == "global":
        total = sum(a.size for a in arrays)
        return [jnp.asarray([round(s * total) for s in levels], count_dtype(total))]
    if scope == "layerwise":
        return [jnp.asarray([round(s * a.size) for s in levels], count_dtype(a.size))
                for a in arrays]
    groups = [a.size // a.shape[-1] if a.size else 0 for a in arrays]
    return [jnp.asarray([round(s * group) for s in levels], jnp.int32) for group in groups]


@functools.partial(jax.jit, static_argnames=("scope", "transform"))
def _levels_arrays(arrays: list[Array], counts: list[Array], rows: Rows, scope: Scope,
                   transform: Callable[[Array], Array] | None) -> list[Array]:
    """`levels`' body: per target array, how many levels keep each weight (uint8; int32 past 255
    levels), for the ascending `counts` of `_removal_counts` (traced, so one program serves every
    sparsity list of a length); `rows` are `group_rows(arrays)`."""
    if scope == "per_output":
        return [_per_output_levels(a, c, transform) for a, c in zip(arrays, counts, strict=True)]
    if scope == "global":
        return _summed_kept(arrays, counts[0], rows, transform)
    # One array a selection: the same kernels for every array of a shape without rows.
    return [_summed_kept([a], c, None, transform)[0]
            for a, c in zip(arrays, counts, strict=True)]


def _summed_kept(arrays: list[Array], counts: Array, rows: Rows,
                 transform: Callable[[Array], Array] | None) -> list[Array]:
    """Per array, how many of `kept_masks(arrays, counts, transform)` keep each weight (the same
    selection: zero-size arrays take no part); `rows` as `select.level_counts` takes."""
    filled = [i for i, a in enumerate(arrays) if a.size]
    out = [jnp.zeros(a.shape, level_count_dtype(counts.shape[0])) for a in arrays]
    if filled:
        summed = kept_level_counts(Leaves([arrays[i] for i in filled], transform), counts,
                                   None if rows is None else tuple(rows[i] for i in filled))
        for i, count in zip(filled, summed, strict=True):
            out[i] = count
    return out


def _level_index(i: Any) -> int:
    """A level index as a Python int; refuses a bool, a non-integer, a traced value, and one
    outside [0, MAX_LEVELS)."""
    try:
        index = None if isinstance(i, bool | np.bool_) else operator.index(i)
    except TypeError:  # a float, a string, a traced value
        index = None
    if index is None:
        raise ValueError(f"the level index is a concrete integer (a Python int), got {i!r}")
    if not 0 <= index < MAX_LEVELS:
        raise ValueError(f"level index {index} is out of range: a levels tree holds levels 0 to "
                         f"at most {MAX_LEVELS - 1}, in the order of the sparsities given")
    return index


def mask_at(levels_tree: PyTree, i: int) -> PyTree:
    """The kept mask (True = kept) of level `i` of a tree made by `levels`: `levels_tree > i`, a
    weight kept at level i iff the first level that prunes it comes later; None where the tree
    has None.

    `i` is a level's index in the sparsities given to `levels`, 0 <= i < 255 (the tree does not
    record how many levels it holds: an index past the last level reads every weight as pruned).
    Refuses a leaf that is not uint8 (a mask or a scores tree), naming it.
    """
    index = _level_index(i)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(levels_tree, is_leaf=_is_none)
    for path, leaf in with_paths:
        dtype = None if leaf is None else (leaf.dtype if hasattr(leaf, "dtype")
                                           else np.result_type(leaf))
        if dtype is not None and dtype != np.uint8:
            raise ValueError(f"the levels tree at {path_string(path)!r} has dtype {dtype}, not "
                             f"uint8: mask_at reads the trees pruning.levels makes")
    leaves = [leaf for _, leaf in with_paths]
    kept = iter(_kept_at([leaf for leaf in leaves if leaf is not None], np.int32(index)))
    return jax.tree_util.tree_unflatten(treedef, [None if leaf is None else next(kept)
                                                  for leaf in leaves])


def _check_input_axis(leaf: Array, path: str) -> None:
    """Refuses, for per-output pruning, a leaf of fewer than 2 axes."""
    if leaf.ndim < 2:
        raise ValueError(f"leaf {path!r} of shape {leaf.shape} has no input axis: per-output "
                         f"pruning compares the inputs of each output unit, so it needs a kernel "
                         f"of at least 2 axes (last = outputs); exclude the leaf or use "
                         f"scope='layerwise'")


def _output_rows(leaf: Array, transform: Callable[[Array], Array] | None) -> Array:
    """Sortable keys of the leaf's scores, row j the output slice `leaf[..., j]` flattened."""
    scores = leaf if transform is None else transform(leaf)
    return sortable_keys(jnp.moveaxis(scores, -1, 0).reshape(leaf.shape[-1], -1))


def _from_rows(rows: Array, shape: tuple[int, ...]) -> Array:
    """An array in `_output_rows`' layout put back in the leaf's shape."""
    return jnp.moveaxis(rows.reshape(shape[-1], *shape[:-1]), 0, -1)


def _per_output_levels(leaf: Array, counts: Array,
                       transform: Callable[[Array], Array] | None) -> Array:
    """`levels` of one leaf (of at least 2 axes) per output, for the ascending `counts` to remove
    from each output slice: each output slice `leaf[..., j]` loses its count lowest scores (ties:
    lower flat position in the slice first; non-finite scores lowest, see `sortable_keys`), and
    the kept masks are added (see `level_count_dtype`) in a loop over the levels, so one level's
    work is held at a time. Each slice's k-th smallest key is found bit by bit (32 counting
    passes, far cheaper than sorting on XLA:CPU)."""
    dtype = level_count_dtype(counts.shape[0])
    if leaf.size == 0:
        return jnp.zeros(leaf.shape, dtype)
    keys = _output_rows(leaf, transform)

    def add(level: Array, total: Array) -> Array:
        return total + (~_lowest_per_row(keys, counts[level])).astype(dtype)

    total = lax.fori_loop(0, counts.shape[0], add, jnp.zeros(keys.shape, dtype))
    return _from_rows(total, leaf.shape)


def _lowest_per_row(keys: Array, count: int | Array) -> Array:
    """Flags of the `count` lowest keys of each row (ties: lower position first); `count` may be
    traced."""
    if isinstance(count, int) and count == 0:
        return jnp.zeros(keys.shape, jnp.bool_)

    def bit(i: Array, kth: Array) -> Array:
        # The largest t with fewer than `count` keys below it is the count-th smallest key.
        candidate = kth | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        below = jnp.sum(keys < candidate[:, None], axis=1, dtype=jnp.int32)
        return jnp.where(below < count, candidate, kth)

    kth = lax.fori_loop(0, 32, bit, jnp.zeros((keys.shape[0],), jnp.uint32))[:, None]
    below = jnp.sum(keys < kth, axis=1, keepdims=True, dtype=jnp.int32)
    ties = keys == kth
    tie_rank = jnp.cumsum(ties, axis=1, dtype=jnp.int32)  # 1 at a row's first tie
    return (keys < kth) | (ties & (tie_rank <= count - below))


def group_kept(groups: Array, n: int) -> Array:
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


def n_of_m(scores: PyTree, n: int, m: int, axis: int = 0, checked: bool = False) -> PyTree:
    """Keeps the n highest scores of every m consecutive weights along `axis` (Flax input: 0).

    Equal scores keep the lower index first. NaN or inf scores are refused eagerly, rank lowest
    in their group under jit, and are refused under `checkify.checkify` with `checked=True` (see
    the module docstring).
    """
    if m < 1 or not 0 <= n <= m:
        raise ValueError(f"N:M needs 0 <= n <= m and m >= 1, got n={n}, m={m}")
    paths, leaves, treedef = _score_leaves(scores)
    targets = [i for i, leaf in enumerate(leaves) if leaf is not None]
    check_finite([paths[i] for i in targets], [leaves[i] for i in targets], scores_message,
                 checked)
    out: list[Any] = []
    for path, leaf in zip(paths, leaves, strict=True):
        if leaf is None:
            out.append(None)
            continue
        if leaf.ndim == 0 or not -leaf.ndim <= axis < leaf.ndim:
            raise ValueError(f"leaf {path!r} of shape {leaf.shape} has no axis {axis} for N:M")
        if leaf.shape[axis] % m:
            raise ValueError(f"leaf {path!r}: axis {axis} has length {leaf.shape[axis]}, not "
                             f"divisible by m={m}; choose another axis or exclude the leaf")
        moved = jnp.moveaxis(leaf, axis, -1)
        groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
        kept = group_kept(groups, n).reshape(moved.shape)
        out.append(jnp.moveaxis(kept, -1, axis))
    return jax.tree_util.tree_unflatten(treedef, out)


def erk_densities(shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[float]:
    """Erdos-Renyi-kernel densities (kept fraction per leaf) for total `sparsity`.

    The kept counts of `erk_kept_counts` over the leaf sizes; 1.0 for a zero-size leaf.
    """
    counts = erk_kept_counts(shapes, sparsity)
    return [count / math.prod(shape) if math.prod(shape) else 1.0
            for count, shape in zip(counts, shapes, strict=True)]


def erk_kept_counts(shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[int]:
    """Weights kept per leaf under ERK: exactly n - round(s * n) of the n weights in all.

    Each leaf's share is c * sum(dims) (a density proportional to sum(dims) / prod(dims)), capped
    at the leaf's size and raised to one weight, the capped and raised leaves' excess or deficit
    redistributed over the others by the choice of c. So every non-empty leaf keeps at least one
    weight (no layer is cut off) unless the sparsity is 1, where none is kept. The shares are
    rounded to integers summing to the total, each within one of its share (largest remainders,
    ties in leaf order). A sparsity that keeps fewer weights than there are non-empty leaves, but
    some, is refused.
    """
    sparsity = _level(sparsity)
    sizes = np.array([math.prod(shape) for shape in shapes], np.int64)
    total = int(sizes.sum())
    budget = total - round(sparsity * total)
    leaves = int(np.count_nonzero(sizes))
    if budget == 0:
        return [0] * len(shapes)
    if budget < leaves:
        raise ValueError(f"ERK at sparsity {sparsity} keeps {budget} of {total} weights, fewer "
                         f"than the {leaves} target leaves, and every leaf keeps at least one "
                         f"weight: lower the sparsity or select fewer leaves")
    widths = np.array([sum(shape) for shape in shapes], np.float64)
    shares = _capped_shares(widths, np.minimum(sizes, 1), sizes, budget)
    return _largest_remainders(shares, np.minimum(sizes, 1), sizes, budget)


def _capped_shares(widths: np.ndarray, low: np.ndarray, high: np.ndarray,
                   budget: int) -> np.ndarray:
    """clip(c * widths, low, high) summing to `budget` (low.sum() <= budget <= high.sum()): c by
    bisection in float64, to the last bit."""
    def shares(c: float) -> np.ndarray:
        return np.clip(c * widths, low, high)

    positive = widths > 0
    below, above = 0.0, float(np.max(high[positive] / widths[positive], initial=1.0))
    while below < (middle := (below + above) / 2) < above:
        if shares(middle).sum() < budget:
            below = middle
        else:
            above = middle
    return shares(above)


def _largest_remainders(shares: np.ndarray, low: np.ndarray, high: np.ndarray,
                        total: int) -> list[int]:
    """Integers in [low, high] summing to `total`: the shares' floors, and one more for the
    largest remainders (ties in leaf order) until the total is reached."""
    counts = np.clip(np.floor(shares), low, high).astype(np.int64)
    order = np.argsort(counts - shares, kind="stable")  # largest remainder first
    missing = total - int(counts.sum())
    while missing > 0:
        for i in order:
            if missing and counts[i] < high[i]:
                counts[i] += 1
                missing -= 1
    return [int(c) for c in counts]


def erk(params: PyTree, sparsity: float, key: Array, where: Selector | None = None) -> PyTree:
    """A random mask keeping `erk_kept_counts` weights of each target leaf, drawn from `key`.

    Exactly round(s * n) of the n target weights are removed; every non-empty target leaf keeps
    at least one weight unless s is 1 (see `erk_kept_counts`).
    """
    levels, single = _levels(sparsity)
    if not single:
        raise ValueError(f"erk takes one sparsity, got {sparsity!r}: call it once per level")
    scores = random_scores(params, key, where)
    _, leaves, treedef = _score_leaves(scores)
    targets = [i for i, leaf in enumerate(leaves) if leaf is not None]
    counts = erk_kept_counts([leaves[i].shape for i in targets], levels[0])
    kept = [kept_masks([leaves[i]], [leaves[i].size - count])[0][0]
            for i, count in zip(targets, counts, strict=True)]
    return _assemble(treedef, leaves, targets, kept)


def apply(params: PyTree, mask: PyTree) -> PyTree:
    """Zeroes the pruned weights; leaves where the mask is None are returned unchanged.

    Refuses a mask of another structure or shape, and a mask leaf that is not bool (a scores
    tree, a float mask), naming the leaf.
    """
    leaves, aligned = _mask_leaves(params, mask)
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
    leaves, aligned = _mask_leaves(params, mask)
    treedef = jax.tree_util.tree_structure(params)
    out = [jnp.ones_like(leaf, dtype=jnp.bool_) if keep is None else keep
           for leaf, keep in zip(leaves, aligned, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _mask_leaves(params: PyTree, mask: PyTree) -> tuple[list[Any], list[Any]]:
    """The parameter leaves and the mask's leaves aligned with them (None off target); refuses a
    mask of another structure or shape, or a mask leaf that is not bool, naming the leaf."""
    paths, leaves, aligned = check_like(params, mask, "mask")
    for path, keep in zip(paths, aligned, strict=True):
        if keep is None:
            continue
        dtype = keep.dtype if hasattr(keep, "dtype") else np.result_type(keep)
        if dtype != np.bool_:
            raise ValueError(f"the mask at {path!r} has dtype {dtype}, not bool: a mask is True "
                             f"where a weight is kept (pruning.unstructured, n_of_m or omp make "
                             f"one); pass scores to pruning.unstructured first")
    return leaves, aligned


def target_leaf_flags(mask: PyTree) -> PyTree:
    """A tree of Python bools with the mask's structure: True on target leaves, False on None ones.

    The per-leaf mask that `optax.masked(inner, target_leaf_flags(mask))` takes: `inner` then
    sees and transforms the target leaves only, and the other leaves' updates pass unchanged.
    """
    return jax.tree.map(lambda keep: keep is not None, mask, is_leaf=_is_none)


def omp(params: PyTree, sparsity: Sparsity, where: Selector | None = None,
        scope: Scope = "global", checked: bool = False) -> tuple[Any, Any]:
    """One-shot magnitude pruning: (pruned params, mask), or lists of both for a list of levels.

    The same masks as `unstructured(magnitude(params, where), ...)`, with |w| computed inside the
    selection instead of stored. NaN or inf weights are refused eagerly, removed first under jit,
    and refused under `checkify.checkify` with `checked=True` (see the module docstring).
    """
    levels, single = _levels(sparsity)
    _check_scope(scope)
    # The weights are checked here; |w| of finite weights is finite, so it is not checked again.
    paths, leaves, treedef = _score_leaves(map_targets(params, where, lambda _, __, leaf: leaf,
                                                       checked))
    selected = _targets(leaves, levels, scope, paths)
    counts = _levels_arrays(selected.arrays, selected.counts, group_rows(selected.arrays), scope,
                            jnp.abs)
    by_level = {}
    for i, s in enumerate(selected.levels):
        pruned, kept = _pruned_at(selected.arrays, counts, np.int32(i))
        by_level[s] = (_with_targets(params, _assemble(treedef, leaves, selected.positions,
                                                       pruned)),
                       _assemble(treedef, leaves, selected.positions, kept))
    pruned, masks = zip(*(by_level[s] for s in levels), strict=True)
    return (pruned[0], masks[0]) if single else (list(pruned), list(masks))


@jax.jit
def _pruned_at(arrays: list[Array], counts: list[Array],
               level: Array) -> tuple[list[Array], list[Array]]:
    """`omp`'s arrays at one level of `_levels_arrays`' counts: the arrays with their pruned
    weights zeroed, and their kept masks (see `_kept_at`)."""
    kept = _kept_at(counts, level)
    return [jnp.where(keep, a, jnp.zeros((), a.dtype)) for keep, a in zip(kept, arrays,
                                                                          strict=True)], kept


def _with_targets(params: PyTree, targets: PyTree) -> PyTree:
    """`params` with its leaves replaced by those of `targets` (a tree of its structure, None
    where a leaf stays as it is)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    replaced = treedef.flatten_up_to(targets)
    return jax.tree_util.tree_unflatten(treedef, [leaf if new is None else new
                                                  for leaf, new in zip(leaves, replaced,
                                                                       strict=True)])
