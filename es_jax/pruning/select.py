"""Exact k-th smallest score across many arrays, without concatenating or sorting them.

Scores are mapped to order-preserving 32-bit keys, and every requested k is found by two counting
passes whose cost does not grow with the number of k:

1. A sample of the keys gives the range where the k-th keys lie. The coarse pass counts the keys in
   each of 2**16 equal blocks of that range (and those below and above it), which places every k-th
   key in one block, with the exact count of keys before that block.
2. The fine pass counts, key by key and leaf by leaf, the keys in those few blocks: every k-th key,
   the count below and equal to it, and in which leaves its ties lie.

If the sample misses (a k-th key outside its range, which is rare), the coarse pass runs again over
all keys; if the range is too wide for per-leaf counts within the memory budget, the fine pass
counts per key only and one more pass counts the ties per leaf. The only cross-device traffic is a
histogram, and no copy of the weights is concatenated.

Ties are broken by leaf order, then by flat index: the elements removed for k are the first k in the
order (key, leaf, flat index), so the count is exact and masks for increasing k are nested. Where a
threshold splits a tie, the cut inside its leaf is found by reading that leaf alone. Every
non-finite score has the lowest key (see `sortable_keys`): values are not checked here.

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

COARSE_BITS = 16
COARSE_BLOCKS = 1 << COARSE_BITS
SPREAD = 64
FINE_BINS = 1 << 21
SAMPLE_SIZE = 1 << 16
_COUNT_ONE = lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(0,),
                                         scatter_dims_to_operand_dims=(0,))


def sortable_keys(scores: Array) -> Array:
    """Order-preserving uint32 keys of float scores (bf16/fp16 widen exactly; -0.0 ties 0.0).

    Every non-finite score (NaN of either sign, +inf, -inf) gets key 0, below the key of every
    finite score (the least, -max float's, is 2**23): non-finite scores are removed first, tied
    with each other, and never kept while a finite score is removed. The largest key, +max
    float's, is 2**32 - 2**23 - 1, so a key plus one never wraps.

    Built from the bits alone, so subnormal scores keep their order on every backend (XLA:CPU's
    float arithmetic would flush them to zero).
    """
    bits = lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
    # Negative scores (sign bit set, magnitude bits not all 0) reverse; -0.0 joins 0.0.
    keys = jnp.where(bits > jnp.uint32(0x80000000), ~bits, bits | jnp.uint32(0x80000000))
    non_finite = (bits & jnp.uint32(0x7FFFFFFF)) >= jnp.uint32(0x7F800000)
    return jnp.where(non_finite, jnp.uint32(0), keys)


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


def _as_float32(_: int, flat: Array) -> Array:
    """Scores as float32, which holds every score dtype exactly."""
    return flat.astype(jnp.float32)


def fold_leaves(leaves: Leaves, body: Callable[[int | Array, Array, Carry], Carry],
                carry: Carry, in_place: bool = True,
                prepare: Callable[[int, Array], Array] = _as_float32) -> Carry:
    """carry = body(index, flat array, carry) for each array, looping over the arrays of one size.

    In place, each array gets its own `lax.switch` branch running `body` on it where it lies:
    fast, but compiled once per array. Otherwise each branch hands out `prepare(index, flat
    array)` (by default a float32 copy) and `body` runs on that outside the branches: compiled
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
                carry = body(group[0], prepare(group[0], leaves.flat(group[0])), carry)
                continue
            prepared = [lambda i=i: prepare(i, leaves.flat(i)) for i in group]

            def step(position: Array, carry: Carry, prepared: list = prepared,
                     group: list[int] = group) -> Carry:
                index = jnp.asarray(group)[position]
                return body(index, lax.switch(position, prepared), carry)

        carry = lax.fori_loop(0, len(group), step, carry)
    return carry




def _spread(keys: Array) -> Array:
    """Bins 0 .. SPREAD - 1 by flat position, for counts that would all go to one address: adding
    to one address over and over serialises the scatter."""
    return lax.broadcasted_iota(jnp.int32, keys.shape, 0) & (SPREAD - 1)


def _count_into(hist: Array, bins: Array, skips: bool) -> Array:
    """hist with one added at each of `bins`. If `skips`, bins past the end (`hist.size`) are
    skipped: cheaper than counting them anywhere where nearly every bin is skipped (the branch is
    predictable), dearer than promising every bin in range where none is."""
    mode = lax.GatherScatterMode.FILL_OR_DROP if skips else lax.GatherScatterMode.PROMISE_IN_BOUNDS
    return lax.scatter_add(hist, bins[:, None], jnp.ones(bins.shape, hist.dtype), _COUNT_ONE,
                           mode=mode)


def _histogram(leaves: Leaves, bin_of: Callable[[int | Array, Array], Array], size: int,
               dtype: jnp.dtype, skips: bool, in_place: bool) -> Array:
    """Counts of bin_of(leaf index, keys) over every array (skipping bins >= size if `skips`):
    one scatter-add pass.

    In place suits a small histogram: XLA copies the histogram into every branch, so a large one
    is updated outside the branches from the bins they hand out (see `fold_leaves`).
    """
    def count(index: int | Array, flat: Array, hist: Array) -> Array:
        return _count_into(hist, bin_of(index, sortable_keys(flat)), skips)

    def add(_: int | Array, bins: Array, hist: Array) -> Array:
        return _count_into(hist, bins, skips)

    hist = jnp.zeros((size,), dtype)
    if in_place:
        return fold_leaves(leaves, count, hist)
    return fold_leaves(leaves, add, hist, in_place=False,
                       prepare=lambda index, flat: bin_of(index, sortable_keys(flat)))


def _kth_bin(counts: Array, k: Array, block: int = SPREAD) -> tuple[Array, Array]:
    """The first bin at which the running total of `counts` reaches k, and the total before it.

    Searched in blocks of `block` bins and then within one block, because a running total over
    every bin is slow on XLA:CPU.
    """
    blocks = counts.reshape(-1, block)
    totals = jnp.cumsum(jnp.sum(blocks, axis=1, dtype=counts.dtype))
    index = jnp.searchsorted(totals, k, side="left").astype(jnp.int32)
    before = jnp.where(index > 0, totals[jnp.maximum(index - 1, 0)], 0)
    running = before + jnp.cumsum(blocks[index], dtype=counts.dtype)
    j = jnp.searchsorted(running, k, side="left").astype(jnp.int32)
    below = jnp.where(j > 0, running[jnp.maximum(j - 1, 0)], before)
    return index * block + j, below.astype(counts.dtype)


def _sample(leaves: Leaves, sample_size: int) -> Array:
    """A sorted sample of the keys, each array sampled in proportion to its size.

    Positions follow a golden-ratio (Weyl) sequence over the flat index: spread evenly, cheap to
    compile, and deterministic; a poor sample costs speed, never exactness.
    """
    parts = []
    for index in range(len(leaves)):
        size = leaves.size(index)
        count = max(1, round(sample_size * size / leaves.total))
        steps = np.arange(count, dtype=np.uint64) + index * 7919
        fraction = ((steps * 0x9E3779B9) % 2**32).astype(np.float64) / 2**32
        positions = np.minimum((fraction * size).astype(np.int64), size - 1)
        parts.append(sortable_keys(leaves.flat(index)[positions]))
    return jnp.sort(jnp.concatenate(parts))


def _sampled_range(sample: Array, total: int, ks: Array) -> tuple[Array, Array]:
    """(lo, shift): the range of keys from lo, under 2**(COARSE_BITS + shift) wide, that the sample
    says holds every k-th key (its keys within four standard deviations of the lowest and the
    highest k-th key's rank)."""
    m = sample.size
    p = ks.astype(jnp.float32) / total
    rank = jnp.round(p * m).astype(jnp.int32) - 1
    margin = (4 * jnp.sqrt(m * p * (1 - p))).astype(jnp.int32) + 2
    low, high = rank[0] - margin[0], rank[-1] + margin[-1]
    lo = jnp.where(low < 0, jnp.uint32(0), sample[jnp.clip(low, 0, m - 1)])
    hi = jnp.where(high >= m, jnp.uint32(2**32 - 1), sample[jnp.clip(high, 0, m - 1)])
    shift = (32 - lax.clz((hi - lo) >> COARSE_BITS).astype(jnp.int32)).astype(jnp.uint32)
    # The range ends within the keys, so keys below lo wrap past it (see `_fine_histogram`).
    return jnp.minimum(lo, ~((jnp.uint32(COARSE_BLOCKS) << shift) - 1)), shift


def _coarse_histogram(leaves: Leaves, lo: Array, shift: Array, dtype: jnp.dtype) -> Array:
    """Counts per block of 2**shift keys from lo, after SPREAD bins of keys below lo and before
    SPREAD bins of keys past the COARSE_BLOCKS blocks. (Skipping the keys below lo and counting
    them as the total less the rest would cost more: the skipping branch is unpredictable.)"""
    def bin_of(_: int | Array, keys: Array) -> Array:
        spread = _spread(keys)
        past = (COARSE_BLOCKS + spread).astype(jnp.uint32)
        block = jnp.minimum((keys - lo) >> shift, past).astype(jnp.int32)
        return jnp.where(keys < lo, spread, SPREAD + block)

    return _histogram(leaves, bin_of, COARSE_BLOCKS + 2 * SPREAD, dtype, skips=False,
                      in_place=True)


def _coarse_blocks(leaves: Leaves, ks: Array, lo: Array,
                   shift: Array) -> tuple[Array, Array, Array, Array]:
    """(lo, shift, block, count before the block) of every k-th key: the coarse pass over the
    sampled range, and again over all keys (lo 0, shift COARSE_BITS) if a k-th key lies outside."""
    def attempt(state: tuple[Array, ...]) -> tuple[Array, ...]:
        tries, lo, shift, _, _ = state
        lo = jnp.where(tries == 0, lo, jnp.uint32(0))
        shift = jnp.where(tries == 0, shift, jnp.uint32(COARSE_BITS))
        hist = _coarse_histogram(leaves, lo, shift, ks.dtype)
        bins, below = jax.vmap(_kth_bin, in_axes=(None, 0))(hist, ks)
        return tries + 1, lo, shift, bins - SPREAD, below

    def missed(state: tuple[Array, ...]) -> Array:
        tries, _, _, block, _ = state
        return (tries == 0) | jnp.any((block < 0) | (block >= COARSE_BLOCKS))

    start = (jnp.int32(0), lo, shift, jnp.zeros(ks.shape, jnp.int32), jnp.zeros_like(ks))
    return lax.while_loop(missed, attempt, start)[1:]


def _fine_keys_per_slot(levels: int, leaves: int) -> int:
    """Keys per level in the fine pass's per-leaf counts: the most that fit FINE_BINS, at most a
    whole coarse block; 0 where not even SPREAD keys fit."""
    fit = FINE_BINS // (levels * leaves)
    keys = 1 << min(COARSE_BITS, fit.bit_length() - 1) if fit else 0
    return keys if keys >= SPREAD else 0


def _fine_histogram(leaves: Leaves, lo: Array, shift: Array, block: Array, slot: Array,
                    region: Array, per_leaf: Array, size: int, dtype: jnp.dtype) -> Array:
    """Counts of the keys in each level's coarse block: level `slot` counts from slot * region,
    key by key and, if per_leaf, leaf by leaf within each key. Other keys are not counted."""
    offset_mask = (jnp.uint32(1) << shift) - 1
    leaf_stride = jnp.where(per_leaf, len(leaves), 1)

    def bin_of(index: int | Array, keys: Array) -> Array:
        # Keys below lo wrap to past the range (`_sampled_range` sees to that), as do keys above
        # it: both find no level's block and are skipped.
        relative = keys - lo
        key_block = (relative >> shift).astype(jnp.int32)
        base = jnp.int32(-1)
        for level in range(block.shape[0]):  # a compare per level beats a table lookup
            base = jnp.where(key_block == block[level], slot[level] * region, base)
        offset = (relative & offset_mask).astype(jnp.int32)
        leaf = jnp.where(per_leaf, index, 0)
        return jnp.where(base >= 0, base + offset * leaf_stride + leaf, size)

    return _histogram(leaves, bin_of, size, dtype, skips=True, in_place=False)


def _leaf_ties(leaves: Leaves, thresholds: Array, dtype: jnp.dtype) -> Array:
    """(levels, leaves) counts of keys equal to each threshold: one pass, compiled once per array
    size (it runs only where the fine pass could not count per leaf)."""
    def count(index: int | Array, flat: Array, counts: Array) -> Array:
        ties = jnp.sum(sortable_keys(flat)[None] == thresholds[:, None], axis=1, dtype=dtype)
        return counts.at[:, index].set(ties)

    start = jnp.zeros((thresholds.shape[0], len(leaves)), dtype)
    return fold_leaves(leaves, count, start, in_place=False)


def kth_keys(leaves: Leaves, ks: Array) -> tuple[Array, Array, Array, Array]:
    """For ascending ks (1 <= k <= size): the k-th key, the count below it, the count equal to it,
    and the count equal to it in each leaf, shape (len(ks), len(leaves))."""
    levels, dtype = ks.shape[0], ks.dtype
    sample = _sample(leaves, min(SAMPLE_SIZE, 4 * leaves.total))
    lo, shift, block, below_block = _coarse_blocks(leaves, ks, *_sampled_range(
        sample, leaves.total, ks))

    # Levels whose k-th keys share a coarse block share its counts: the first such level's slot.
    slot = jnp.argmax(block[None, :] == block[:, None], axis=1).astype(jnp.int32)
    keys_per_slot = _fine_keys_per_slot(levels, len(leaves))
    per_leaf = shift <= keys_per_slot.bit_length() - 1 if keys_per_slot else jnp.bool_(False)
    region = jnp.where(per_leaf, keys_per_slot * len(leaves), COARSE_BLOCKS)
    size = levels * max(keys_per_slot * len(leaves), COARSE_BLOCKS)
    hist = _fine_histogram(leaves, lo, shift, block, slot, region, per_leaf, size, dtype)

    def key_at(offset: Array) -> Array:
        return lo + (block.astype(jnp.uint32) << shift) + offset.astype(jnp.uint32)

    def within_block(key_counts: Array) -> tuple[Array, Array, Array]:
        offset, below = jax.vmap(_kth_bin)(key_counts, ks - below_block)
        equal = jnp.take_along_axis(key_counts, offset[:, None], 1)[:, 0]
        return offset, below_block + below, equal

    def counted_per_leaf() -> tuple[Array, ...]:
        counts = hist[:levels * keys_per_slot * len(leaves)].reshape(
            levels, keys_per_slot, len(leaves))[slot]
        offset, below, equal = within_block(jnp.sum(counts, axis=2, dtype=dtype))
        return offset, below, equal, jnp.take_along_axis(counts, offset[:, None, None], 1)[:, 0]

    def counted_per_key() -> tuple[Array, ...]:
        offset, below, equal = within_block(
            hist[:levels * COARSE_BLOCKS].reshape(levels, COARSE_BLOCKS)[slot])
        return offset, below, equal, _leaf_ties(leaves, key_at(offset), dtype)

    if keys_per_slot:
        offset, below, equal, leaf_ties = lax.cond(per_leaf, counted_per_leaf, counted_per_key)
    else:
        offset, below, equal, leaf_ties = counted_per_key()
    return key_at(offset), below, equal, leaf_ties


def _row_length(size: int) -> int:
    """The largest divisor of `size` up to 4096: blocks for short running totals."""
    return next((r for r in range(min(size, 4096), 0, -1) if size % r == 0), 1)


def _tie_cuts(leaves: Leaves, thresholds: Array, ties_to_remove: Array, equal: Array,
              leaf_ties: Array) -> tuple[Array, Array]:
    """Per level, where the removal of threshold-tied elements stops: (leaf, last flat index).

    Ties are removed in leaf order, then flat order: all of them in leaves before the returned
    leaf, and those at flat index <= the returned index in it. Levels whose ties all go get
    leaf = number of leaves. Only the cut leaf of each level is read.
    """
    dtype = ties_to_remove.dtype
    levels = thresholds.shape[0]
    partial = ties_to_remove < equal
    cumulative = jnp.cumsum(leaf_ties, axis=1, dtype=dtype)
    leaf = jax.vmap(lambda c, t: jnp.searchsorted(c, t, side="left"))(cumulative, ties_to_remove)
    leaf = jnp.where(partial, leaf.astype(jnp.int32), len(leaves))
    before = jnp.where(leaf > 0, cumulative[jnp.arange(levels), jnp.maximum(leaf - 1, 0)], 0)
    quota = ties_to_remove - before

    groups = _size_groups(leaves)
    group_of = np.zeros(len(leaves) + 1, np.int32)
    for g, group in enumerate(groups):
        group_of[group] = g
    group_of[-1] = len(groups)

    def cut_in(group: list[int], level: Array) -> Array:
        # Only the cut leaf is read, so it may be copied out.
        member = jnp.argmax(jnp.asarray(group) == leaf[level])
        flat = lax.switch(member, [lambda i=i: leaves.flat(i).astype(jnp.float32) for i in group])
        ties = (sortable_keys(flat) == thresholds[level]).astype(dtype)
        return _kth_bin(ties, quota[level], _row_length(flat.size))[0].astype(dtype)

    def level_cut(level: Array, cuts: Array) -> Array:
        branches = [lambda g=g: cut_in(g, level) for g in groups] + [lambda: jnp.zeros((), dtype)]
        return cuts.at[level].set(lax.switch(jnp.asarray(group_of)[leaf[level]], branches))

    cuts = lax.cond(jnp.any(partial),
                    lambda: lax.fori_loop(0, levels, level_cut, jnp.zeros((levels,), dtype)),
                    lambda: jnp.zeros((levels,), dtype))
    return leaf, cuts


@jax.jit
def _kept_masks(leaves: Leaves, counts: Array) -> list[list[Array]]:
    """Kept masks, one list of per-array masks for each count."""
    ks = jnp.maximum(counts, 1)
    thresholds, below, equal, leaf_ties = kth_keys(leaves, ks)
    cut_leaf, cut_index = _tie_cuts(leaves, thresholds, ks - below, equal, leaf_ties)

    # Tied weights at flat positions up to `last_removed` go: all of them in leaves before the
    # cut, none after it (nor when nothing is removed, where the threshold is the smallest key).
    # Computed for every array and level at once: thousands of scalar ops would each compile.
    index = np.arange(len(leaves))[:, None]
    sizes = np.asarray([array.size for array in leaves.arrays])[:, None]
    last_removed = jnp.where(index < cut_leaf, sizes - 1,
                             jnp.where(index == cut_leaf, cut_index.astype(jnp.int32), -1))
    last_removed = jnp.where(counts == 0, -1, last_removed)

    per_array = []
    for i, array in enumerate(leaves.arrays):
        keys = sortable_keys(leaves.flat(i))
        position = lax.iota(jnp.int32, array.size)
        # Kept: above the threshold, or equal to it past the last removed position.
        per_array.append([(keys >= thresholds[level] + (position <= last_removed[i, level]))
                          .reshape(array.shape) for level in range(counts.shape[0])])
    return [list(level) for level in zip(*per_array, strict=True)]


def kept_masks(scores: Sequence[Array], counts_to_remove: Sequence[int],
               transform: Callable[[Array], Array] | None = None) -> list[list[Array]]:
    """Bool kept-masks (one list of per-array masks per count) removing the lowest scores.

    Counts must be ascending, between 0 (keep everything) and the total size. With `transform`
    (an elementwise function such as `jnp.abs`) the scores are `transform(array)`, computed where
    they are read rather than stored. A zero-size array has an empty mask and takes no part in
    the selection. Non-finite scores rank below every finite one (see `sortable_keys`).
    """
    arrays = [jnp.asarray(s) for s in scores]
    counts = list(counts_to_remove)
    total = sum(a.size for a in arrays)
    if counts != sorted(counts):
        raise ValueError(f"counts to remove must be ascending, got {counts}")
    if counts and not 0 <= counts[0] <= counts[-1] <= total:
        raise ValueError(f"counts to remove must lie in [0, {total}], got {counts}")
    counts_array = jnp.asarray(counts, count_dtype(total))
    filled = [i for i, a in enumerate(arrays) if a.size]
    if len(filled) == len(arrays):
        return _kept_masks(Leaves(arrays, transform), counts_array)
    selected = (_kept_masks(Leaves([arrays[i] for i in filled], transform), counts_array)
                if filled else [[] for _ in counts])
    return [_with_empty_masks(arrays, filled, level) for level in selected]


def _with_empty_masks(arrays: list[Array], filled: list[int], masks: list[Array]) -> list[Array]:
    """`masks` at the positions `filled` of `arrays`, an empty bool mask at the others."""
    by_position = dict(zip(filled, masks, strict=True))
    return [by_position[i] if i in by_position else jnp.ones(a.shape, jnp.bool_)
            for i, a in enumerate(arrays)]
