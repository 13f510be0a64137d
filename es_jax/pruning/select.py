"""Exact k-th smallest score across many arrays, without concatenating or sorting them.

Scores are mapped to order-preserving 32-bit keys. A sample of the keys estimates each requested
k-th key; one pass then scatters every key into a histogram that counts, key by key, a window of
keys around each estimate (as wide as the sample's uncertainty, at most WINDOW keys), and each gap
between windows as a single bin. A k-th key that falls in a window is found exactly. If the sample
missed (the k-th key lies in a gap, which is rare), two data-independent passes find it instead (a
histogram of 2**16-key blocks, then the windowed pass again, on the right blocks). So any number of
sparsity levels costs one pass over the weights in practice, the only cross-device traffic is a
histogram, and no copy of the weights is concatenated.

Ties are broken by leaf order, then by flat index: the elements removed for k are the first k in the
order (key, leaf, flat index), so the count is exact and masks for increasing k are nested. Where a
threshold splits a tie, one counting pass finds the leaf and the position of the cut.

Every per-array pass is a `fori_loop` over the arrays of one size (see `fold_leaves`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Carry = TypeVar("Carry")

BLOCK_BITS = 16
NUM_BLOCKS = 1 << (32 - BLOCK_BITS)
WINDOW = 1 << 19
GAP_SPREAD = 64
SAMPLE_SIZE = 1 << 18
_TOP = np.uint32(2**32 - WINDOW)


def sortable_keys(scores: Array) -> Array:
    """Order-preserving uint32 keys of float scores (bf16/fp16 widen exactly; -0.0 ties 0.0).

    Built from the bits alone, so subnormal scores keep their order on every backend (XLA:CPU's
    float arithmetic would flush them to zero).
    """
    bits = lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
    bits = jnp.where((bits & jnp.uint32(0x7FFFFFFF)) == 0, jnp.uint32(0), bits)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def count_dtype(total: int) -> jnp.dtype:
    """The integer dtype that holds counts (and flat positions) up to `total`."""
    if total < 2**32:
        return jnp.dtype(jnp.uint32)
    raise ValueError(f"{total} target weights: exact selection supports fewer than 2**32; prune "
                     f"the model in parts (e.g. layer-wise) or select fewer leaves")


@jax.tree_util.register_pytree_node_class
class Leaves:
    """The score arrays of a selection, each read as `transform(array)` where it is used.

    With a transform (|w| for magnitude pruning) the scores are computed inside every pass
    instead of being materialised, which saves a pass and four bytes per weight.
    """

    def __init__(self, arrays: Sequence[Array], transform: Callable[[Array], Array] | None = None):
        self.arrays = tuple(arrays)
        self.transform = transform

    def tree_flatten(self) -> tuple[tuple[Array, ...], Callable | None]:
        return self.arrays, self.transform

    @classmethod
    def tree_unflatten(cls, transform: Callable | None, arrays: Sequence[Array]) -> Leaves:
        return cls(arrays, transform)

    def __len__(self) -> int:
        return len(self.arrays)

    def size(self, index: int) -> int:
        """The number of scores in array `index`."""
        return self.arrays[index].size

    @property
    def total(self) -> int:
        """The number of scores in all arrays."""
        return sum(a.size for a in self.arrays)

    def flat(self, index: int) -> Array:
        """Array `index`'s scores, flattened."""
        flat = self.arrays[index].reshape(-1)
        return flat if self.transform is None else self.transform(flat)


def _size_groups(leaves: Leaves) -> list[list[int]]:
    """Indices of the arrays grouped by size, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for index in range(len(leaves)):
        groups.setdefault(leaves.size(index), []).append(index)
    return list(groups.values())


def _as_float32(flat: Array) -> Array:
    """Scores as float32, which holds every score dtype exactly."""
    return flat.astype(jnp.float32)


def fold_leaves(leaves: Leaves, body: Callable[[int | Array, Array, Carry], Carry],
                carry: Carry, in_place: bool = True,
                prepare: Callable[[Array], Array] = _as_float32) -> Carry:
    """carry = body(index, flat array, carry) for each array, looping over the arrays of one size.

    In place, each array gets its own `lax.switch` branch running `body` on it where it lies:
    fast, but compiled once per array. Otherwise each branch hands out `prepare(flat array)` (by
    default a float32 copy) and `body` runs on that outside the branches, once per size: compiled
    once per size, and the way to update a carry too large for XLA to copy into every branch.
    """
    for group in _size_groups(leaves):
        if in_place:
            if len(group) == 1:
                carry = body(group[0], leaves.flat(group[0]), carry)
                continue
            branches = [lambda carry, i=i: body(i, leaves.flat(i), carry) for i in group]

            def step(position: Array, carry: Carry, branches: list = branches) -> Carry:
                return lax.switch(position, branches, carry)
        else:
            if len(group) == 1:
                carry = body(group[0], prepare(leaves.flat(group[0])), carry)
                continue
            prepared = [lambda i=i: prepare(leaves.flat(i)) for i in group]

            def step(position: Array, carry: Carry, prepared: list = prepared,
                     group: list[int] = group) -> Carry:
                index = jnp.asarray(group)[position]
                return body(index, lax.switch(position, prepared), carry)

        carry = lax.fori_loop(0, len(group), step, carry)
    return carry


def _histogram(leaves: Leaves, bin_of: Callable[[Array], Array], size: int,
               dtype: jnp.dtype, in_place: bool = True) -> Array:
    """Counts of bin_of(keys) over every array: one scatter-add pass (see `fold_leaves`).

    A branch that scatters into the histogram gets its own copy of it from XLA, so a large
    histogram is updated outside the branches instead, from the bins each branch returns.
    """
    def add(_: int | Array, bins: Array, hist: Array) -> Array:
        # Bins are in range by construction; promising so skips XLA's per-update bounds handling.
        return hist.at[bins].add(jnp.ones((), dtype), mode="promise_in_bounds")

    def bins(flat: Array) -> Array:
        return bin_of(sortable_keys(flat))

    def count(index: int | Array, flat: Array, hist: Array) -> Array:
        return add(index, bins(flat), hist)

    hist = jnp.zeros((size,), dtype)
    if not in_place:  # a rare pass: float32 copies out of the branches, counted once per size
        return fold_leaves(leaves, count, hist, in_place=False)
    if len(leaves) * size <= leaves.total:
        return fold_leaves(leaves, count, hist)
    return fold_leaves(leaves, add, hist, in_place=False, prepare=bins)


def _sample(leaves: Leaves, sample_size: int) -> Array:
    """A sorted sample of the keys, each array sampled in proportion to its size.

    Positions follow a golden-ratio (Weyl) sequence over the flat index: spread evenly, cheap to
    compile, and deterministic; a poor sample costs speed, never exactness.
    """
    counts = [max(1, round(sample_size * leaves.size(i) / leaves.total))
              for i in range(len(leaves))]
    offsets = np.cumsum([0, *counts[:-1]])
    sample = jnp.zeros((sum(counts),), jnp.uint32)

    def body(index: int, flat: Array, sample: Array) -> Array:
        steps = jnp.arange(counts[index], dtype=jnp.uint32) + jnp.uint32(index * 7919)
        fraction = (steps * jnp.uint32(0x9E3779B9)).astype(jnp.float32) * (1.0 / 2**32)
        positions = jnp.minimum((fraction * flat.size).astype(jnp.int32), flat.size - 1)
        return lax.dynamic_update_slice(sample, sortable_keys(flat[positions]), (offsets[index],))

    return jnp.sort(fold_leaves(leaves, body, sample))


def _disjoint(starts: Array) -> Array:
    """Ascending window starts, each pushed to at least one window past the previous one."""
    out = [starts[0]]
    for start in starts[1:]:
        earliest = jnp.where(out[-1] > _TOP - WINDOW, _TOP, out[-1] + WINDOW)
        out.append(jnp.maximum(start, earliest))
    return jnp.stack(out)


def _sample_windows(sample: Array, total: int, ks: Array) -> tuple[Array, Array]:
    """Per k, a window of keys (start, length) that the sample says holds the k-th key.

    The window spans the sample's keys within four standard deviations of the k-th key's rank,
    at most WINDOW keys around the estimate: the fewer keys and weights a window covers, the
    fewer scattered counts miss the cache.
    """
    m = sample.size
    p = ks.astype(jnp.float32) / total
    rank = jnp.round(p * m).astype(jnp.int32) - 1
    spread = (4 * jnp.sqrt(m * p * (1 - p))).astype(jnp.int32) + 2
    estimate = sample[jnp.clip(rank, 0, m - 1)]
    low = jnp.where(rank - spread < 0, 0, sample[jnp.clip(rank - spread, 0, m - 1)])
    high = jnp.where(rank + spread >= m, jnp.uint32(2**32 - 1),
                     sample[jnp.clip(rank + spread, 0, m - 1)])
    narrow = high - low < WINDOW
    start = jnp.where(narrow, low, jnp.maximum(estimate, WINDOW // 2) - WINDOW // 2)
    start = jnp.minimum(start, _TOP)
    last = jnp.where(narrow, high, start + (WINDOW - 1))
    start = _disjoint(start)
    return start, jnp.where(last >= start, last - start + 1, 0)


def _windowed_histogram(leaves: Leaves, starts: Array, lengths: Array, dtype: jnp.dtype,
                        in_place: bool = True) -> Array:
    """One pass: per-key counts inside each window, one count for each gap between windows.

    Window l covers keys [starts[l], starts[l] + lengths[l]), lengths at most WINDOW. Bin layout,
    in key order: gap 0 (GAP_SPREAD bins), window 0 (WINDOW bins), gap 1, window 1, ..., gap L.
    Each gap's count is spread over its bins by the key's low bits: nearly every weight falls in a
    gap, and adding to one address over and over would serialise the scatter.
    """
    levels = starts.shape[0]
    stride = WINDOW + GAP_SPREAD
    # Per window: what to add to a key to get its bin (uint32 arithmetic wraps to the bin), the
    # key just past the window, and the first bin of the gap after it.
    shift = jnp.arange(levels, dtype=jnp.uint32) * stride + GAP_SPREAD - starts
    ends = starts + lengths

    def bin_of(keys: Array) -> Array:
        # Windows are ascending and disjoint: the last one starting at or below a key is its own.
        key_shift, end, gap = jnp.uint32(0), jnp.uint32(0), jnp.int32(0)
        for level in range(levels):
            started = keys >= starts[level]
            key_shift = jnp.where(started, shift[level], key_shift)
            end = jnp.where(started, ends[level], end)
            gap = jnp.where(started, (level + 1) * stride, gap)
        spread = (keys & jnp.uint32(GAP_SPREAD - 1)).astype(jnp.int32)
        return jnp.where(keys < end, (keys + key_shift).astype(jnp.int32), gap + spread)

    return _histogram(leaves, bin_of, levels * stride + GAP_SPREAD, dtype, in_place)


def _windowed_kth(hist: Array, starts: Array, ks: Array) -> tuple[Array, ...]:
    """Each k-th key from a windowed histogram: (found, key, count below it, count equal).

    Searched in two levels, blocks of GAP_SPREAD bins and then one block, because a running
    total over every bin is slow on XLA:CPU. Each gap fills exactly one block.
    """
    blocks_per_level = WINDOW // GAP_SPREAD + 1
    block_totals = jnp.cumsum(jnp.sum(hist.reshape(-1, GAP_SPREAD), axis=1, dtype=hist.dtype))

    def one(k: Array) -> tuple[Array, ...]:
        block = jnp.searchsorted(block_totals, k, side="left").astype(jnp.int32)
        before = jnp.where(block > 0, block_totals[jnp.maximum(block - 1, 0)], 0)
        counts = lax.dynamic_slice(hist, (block * GAP_SPREAD,), (GAP_SPREAD,))
        running = before + jnp.cumsum(counts, dtype=hist.dtype)
        j = jnp.searchsorted(running, k, side="left").astype(jnp.int32)
        level, offset = block // blocks_per_level, block % blocks_per_level - 1
        found = offset >= 0
        key = (starts[jnp.minimum(level, starts.shape[0] - 1)]
               + (offset * GAP_SPREAD + j).astype(jnp.uint32))
        below = jnp.where(j > 0, running[jnp.maximum(j - 1, 0)], before)
        return found, key, below.astype(hist.dtype), counts[j]

    return jax.vmap(one)(ks)


def _block_histogram(leaves: Leaves, dtype: jnp.dtype) -> Array:
    """One pass (compiled once per array size: it only runs when a sample missed): counts of keys
    per block of 2**BLOCK_BITS consecutive keys."""
    return _histogram(leaves, lambda keys: (keys >> BLOCK_BITS).astype(jnp.int32), NUM_BLOCKS,
                      dtype, in_place=False)


def _block_windows(leaves: Leaves, ks: Array) -> tuple[Array, Array]:
    """Windows that surely hold the k-th keys: each starts on its k-th key's block of keys."""
    cumulative = jnp.cumsum(_block_histogram(leaves, ks.dtype))
    block = jnp.searchsorted(cumulative, ks, side="left").astype(jnp.uint32)
    starts = _disjoint(jnp.minimum(block << BLOCK_BITS, _TOP))
    return starts, jnp.full_like(starts, WINDOW)


def kth_keys(leaves: Leaves, ks: Array) -> tuple[Array, Array, Array]:
    """For ascending ks (1 <= k <= size): the k-th key, the count below it, the count equal.

    The windowed pass runs on the sample's windows and, only if one missed, again on windows
    placed by a block histogram (that rare path is compiled once per array size).
    """
    total = leaves.total
    # Many levels mean many windows whose bins miss the cache; a 4x sample halves their width
    # (measured: 10% off a 9-level selection of BERT-base, a loss for one level).
    sample_size = SAMPLE_SIZE * (4 if ks.shape[0] >= 5 else 1)
    windows = _sample_windows(_sample(leaves, min(sample_size, 4 * total)), total, ks)

    def attempt(windows: tuple[Array, Array], in_place: bool) -> tuple[Array, ...]:
        hist = _windowed_histogram(leaves, *windows, ks.dtype, in_place)
        return _windowed_kth(hist, windows[0], ks)

    found, key, below, equal = attempt(windows, in_place=True)
    return lax.cond(jnp.all(found), lambda: (key, below, equal),
                    lambda: attempt(_block_windows(leaves, ks), in_place=False)[1:])


def _key_values(keys: Array) -> Array:
    """The float32 scores that `sortable_keys` maps to these keys."""
    positive = (keys >> 31) == 1
    bits = jnp.where(positive, keys & jnp.uint32(0x7FFFFFFF), ~keys)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _row_length(size: int) -> int:
    """The largest divisor of `size` up to 4096: rows short enough to count in float32."""
    return next((r for r in range(min(size, 4096), 0, -1) if size % r == 0), 1)


def _tie_cuts(leaves: Leaves, thresholds: Array, ties_to_remove: Array,
              partial: Array) -> tuple[Array, Array]:
    """Per level, where the removal of threshold-tied elements stops: (leaf, last flat index).

    Ties are removed in leaf order, then flat order: all of them in leaves before the returned
    leaf, and those at flat index <= the returned index in it. Levels that are not `partial` (all
    their ties go) get leaf = number of leaves. One counting pass serves every level.
    """
    dtype = ties_to_remove.dtype
    levels = thresholds.shape[0]
    values = _key_values(thresholds)
    # Float arithmetic tells ties apart exactly unless a threshold is tiny (or infinite), where
    # flushed subnormals would blur it; those levels are counted on the integer keys instead.
    fast = jnp.all(~partial | (jnp.abs(values) >= 2.0**-100) & jnp.isfinite(values))

    def counts_with(row_ties: Callable[[Array], Array], in_place: bool) -> Array:
        def count(index: int | Array, flat: Array, counts: Array) -> Array:
            return counts.at[index].set(jnp.sum(row_ties(flat), axis=1, dtype=dtype))

        return fold_leaves(leaves, count, jnp.zeros((len(leaves), levels), dtype), in_place)

    def float_row_ties(flat: Array) -> Array:
        rows = flat.astype(jnp.float32).reshape(-1, _row_length(flat.size))
        differs = jnp.minimum(jnp.ceil(jnp.abs(rows[None] - values[:, None, None])), 1.0)
        return (rows.shape[1] - jnp.sum(differs, axis=2)).astype(dtype)

    def key_row_ties(flat: Array) -> Array:
        rows = sortable_keys(flat).reshape(-1, _row_length(flat.size))
        return jnp.sum(rows[None] == thresholds[:, None, None], axis=2, dtype=dtype)

    # The integer path is rare (tiny thresholds), so it is compiled once per array size.
    per_leaf = lax.cond(fast, lambda: counts_with(float_row_ties, in_place=True),
                        lambda: counts_with(key_row_ties, in_place=False))
    cumulative = jnp.cumsum(per_leaf, axis=0)
    leaf = jax.vmap(lambda c, t: jnp.searchsorted(c, t, side="left"))(cumulative.T, ties_to_remove)
    leaf = jnp.where(partial, leaf.astype(jnp.int32), len(leaves))
    before = jnp.where(leaf > 0, cumulative[jnp.maximum(leaf - 1, 0), jnp.arange(levels)], 0)
    quota = ties_to_remove - before

    groups = _size_groups(leaves)
    group_of = np.zeros(len(leaves) + 1, np.int32)
    for g, group in enumerate(groups):
        group_of[group] = g
    group_of[-1] = len(groups)

    def cut_in(group: list[int], level: Array) -> Array:
        # Only the cut leaf is read, so it may be copied out.
        member = jnp.argmax(jnp.asarray(group) == leaf[level])
        flat = lax.switch(member, [lambda i=i: _as_float32(leaves.flat(i)) for i in group])
        # The row holding the cut, then the cut within that row: short running totals only.
        rows = sortable_keys(flat).reshape(-1, _row_length(flat.size)) == thresholds[level]
        row_totals = jnp.cumsum(jnp.sum(rows, axis=1, dtype=dtype))
        row = jnp.searchsorted(row_totals, quota[level], side="left").astype(jnp.int32)
        before_row = jnp.where(row > 0, row_totals[jnp.maximum(row - 1, 0)], 0)
        running = jnp.cumsum(rows[row], dtype=dtype)
        column = jnp.searchsorted(running, quota[level] - before_row, side="left")
        return (row * rows.shape[1] + column).astype(dtype)

    def level_cut(level: Array, cuts: Array) -> Array:
        branches = [lambda g=g: cut_in(g, level) for g in groups] + [lambda: jnp.zeros((), dtype)]
        return cuts.at[level].set(lax.switch(jnp.asarray(group_of)[leaf[level]], branches))

    return leaf, lax.fori_loop(0, levels, level_cut, jnp.zeros((levels,), dtype))


@jax.jit
def _kept_masks(leaves: Leaves, counts: Array) -> list[Array]:
    """Per array, its kept masks for every count, shape (levels, *array shape)."""
    thresholds, below, equal = kth_keys(leaves, jnp.maximum(counts, 1))
    ties_to_remove = jnp.maximum(counts, 1) - below

    partial = ties_to_remove < equal
    cut_leaf, cut_index = lax.cond(
        jnp.any(partial), lambda: _tie_cuts(leaves, thresholds, ties_to_remove, partial),
        lambda: (jnp.full(counts.shape, len(leaves), jnp.int32), jnp.zeros_like(counts)))
    masks = []
    for index, array in enumerate(leaves.arrays):
        # Tied weights at flat positions up to `last_removed` go: all of them in leaves before
        # the cut, none after it (nor when nothing is removed, where the threshold is the
        # smallest key).
        last_removed = jnp.where(index < cut_leaf, array.size - 1,
                                 jnp.where(index == cut_leaf, cut_index.astype(jnp.int32), -1))
        last_removed = jnp.where(counts == 0, -1, last_removed)[:, None]
        keys = sortable_keys(leaves.flat(index))
        flat_index = jnp.arange(keys.size, dtype=jnp.int32)
        kept = ((keys > thresholds[:, None])
                | ((keys == thresholds[:, None]) & (flat_index > last_removed)))
        masks.append(kept.reshape(counts.shape + array.shape))
    return masks


def kept_masks(scores: Sequence[Array], counts_to_remove: Sequence[int],
               transform: Callable[[Array], Array] | None = None) -> list[list[Array]]:
    """Bool kept-masks (one list of per-array masks per count) removing the lowest scores.

    Counts must be ascending, between 0 (keep everything) and the total size. With `transform`
    (an elementwise function such as `jnp.abs`) the scores are `transform(array)`, computed where
    they are read rather than stored.
    """
    leaves = Leaves([jnp.asarray(s) for s in scores], transform)
    total = leaves.total
    if list(counts_to_remove) != sorted(counts_to_remove):
        raise ValueError(f"counts to remove must be ascending, got {list(counts_to_remove)}")
    if counts_to_remove and not 0 <= counts_to_remove[0] <= counts_to_remove[-1] <= total:
        raise ValueError(f"counts to remove must lie in [0, {total}], got {list(counts_to_remove)}")
    counts = jnp.asarray(list(counts_to_remove), count_dtype(total))
    per_array = _kept_masks(leaves, counts)
    return [[masks[level] for masks in per_array] for level in range(len(counts_to_remove))]
