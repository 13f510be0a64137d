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
histogram, and the weights are never copied all at once: a pass copies at most one chunk of them
(CHUNK_SCORES scores) at a time.

Ties are broken by leaf order, then by flat index: the elements removed for k are the first k in the
order (key, leaf, flat index), so the count is exact and masks for increasing k are nested. Where a
threshold splits a tie, the cut inside its leaf is found by reading that leaf's chunk alone. Every
non-finite score has the lowest key (see `sortable_keys`): values are not checked here.

Compile time. XLA:CPU compiles each distinct kernel once (about 10 ms each) and every instruction
of a program costs its passes some time, so code repeated for every array, with the array's index
baked in, compiled for minutes at hundreds of arrays. Here every pass is a loop over the arrays of
one size and dtype (see `fold_group`), whose body is compiled once per group: an array costs the
program only an operand of a copy. What must be made for each array, its counts of kept levels, is
made by the same kernel for every array of a shape, from its position passed to the program as a
value (see `level_counts`), so compile time grows little with the number of arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

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
SMALL_SCORES = 1 << 16
CHUNK_SCORES = 1 << 20
IN_PLACE_BYTES = 1 << 19
_COUNT_ONE = lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(0,),
                                         scatter_dims_to_operand_dims=(0,))
# Elements of a (1, size) row at positions (n, 1): shape (n,).
_ROW_ELEMENTS = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0, 1),
                                           start_index_map=(1,))


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
    """The score arrays of a selection, each held as one row (1, size) and read as
    `transform(row)` where it is used.

    With a transform (|w| for magnitude pruning) the scores are computed inside every pass
    instead of being materialised, which saves a pass and four bytes per weight. Each array is
    reshaped once, where the selection starts, and every pass reads that row.
    """

    def __init__(self, arrays: Sequence[Array], transform: Callable[[Array], Array] | None = None,
                 shapes: Sequence[tuple[int, ...]] | None = None):
        self.shapes = tuple(a.shape for a in arrays) if shapes is None else tuple(shapes)
        self.rows = tuple(a.reshape(1, -1) for a in arrays)
        self.transform = transform

    def tree_flatten(self) -> tuple[tuple[Array, ...], tuple]:
        return self.rows, (self.transform, self.shapes)

    @classmethod
    def tree_unflatten(cls, aux: tuple, rows: Sequence[Array]) -> Leaves:
        transform, shapes = aux
        return cls(rows, transform, shapes)

    def __len__(self) -> int:
        return len(self.rows)

    def size(self, index: int) -> int:
        """The number of scores in array `index`."""
        return self.rows[index].shape[1]

    @property
    def total(self) -> int:
        """The number of scores in all arrays."""
        return sum(row.shape[1] for row in self.rows)

    def scores(self, values: Array) -> Array:
        """The scores of some of the arrays' values: `transform(values)`."""
        return values if self.transform is None else self.transform(values)

    def flat(self, index: int) -> Array:
        """Array `index`'s scores, flattened."""
        return self.scores(self.rows[index].reshape(-1))


def _groups(leaves: Leaves) -> list[list[int]]:
    """Indices of the arrays grouped by size and dtype, in order of first appearance."""
    groups: dict[tuple[int, jnp.dtype], list[int]] = {}
    for index, row in enumerate(leaves.rows):
        groups.setdefault((row.size, row.dtype), []).append(index)
    return list(groups.values())


def chunk_plan(leaves: Leaves) -> list[list[list[int]]]:
    """Per group of arrays of one size and dtype, its array indices in order, cut into chunks of
    equal length: for small arrays (at most SMALL_SCORES scores), the largest divisor of the
    group's length whose chunk holds at most CHUNK_SCORES scores; for large ones, one array a
    chunk."""
    plan = []
    for group in _groups(leaves):
        size = leaves.size(group[0])
        fit = CHUNK_SCORES // size if size <= SMALL_SCORES else 1
        rows = max(d for d in range(1, min(fit, len(group)) + 1) if len(group) % d == 0)
        plan.append([group[start:start + rows] for start in range(0, len(group), rows)])
    return plan


def read_chunk(leaves: Leaves, chunks: list[list[int]], position: int | Array) -> Array:
    """Chunk `position` of one group's `chunks`: its arrays flattened, one row each (rows, size),
    a copy (with several chunks, in one `lax.switch` branch per chunk). The barrier keeps XLA
    from moving the copy into a loop that reads it, where every read would pick its array."""
    branches = [lambda c=c: lax.optimization_barrier(
        lax.concatenate([leaves.rows[i] for i in c], 0)) for c in chunks]
    return branches[0]() if len(chunks) == 1 else lax.switch(position, branches)


def _keys(_: Array, keys: Array) -> Array:
    """An array's keys, as they are."""
    return keys


def fold_group(leaves: Leaves, chunks: list[list[int]],
               body: Callable[[Array, Array, Array, Carry], Carry], carry: Carry,
               prepare: Callable[[Array, Array], Array] = _keys) -> Carry:
    """carry = body(index, member, prepare(index, keys), carry) for every array of one group of
    `chunk_plan`: `index` the array's index, `member` its position in the group, `keys` its flat
    keys.

    Small arrays: a `fori_loop` over the chunks, each copied out (see `read_chunk`), and within it
    over the chunk's rows, one array at a time, so that `prepare` and `body` are compiled once per
    group and each array costs the program one operand of a copy, not code of its own. Large
    arrays (a chunk each), whose passes cost far more than compiling them: a `fori_loop` over the
    arrays, each read where it lies in a `lax.switch` branch of its own, which hands `prepare`'s
    result to `body` (no copy of the array); where the carry is small (at most IN_PLACE_BYTES,
    which XLA copies into every branch), `body` runs in the branch too.
    """
    rows = len(chunks[0])
    if rows == 1:
        indices = [index for (index,) in chunks]
        in_place = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(carry)) <= IN_PLACE_BYTES

        def prepared(index: int) -> Array:
            return prepare(jnp.int32(index), sortable_keys(leaves.flat(index)))

        if in_place:
            branches = [lambda carry, member=member, index=index: body(
                jnp.int32(index), jnp.int32(member), prepared(index), carry)
                for member, index in enumerate(indices)]

            def array_step(member: int | Array, carry: Carry) -> Carry:
                return lax.switch(member, branches, carry)
        else:
            outs = [lambda index=index: prepared(index) for index in indices]
            table = jnp.asarray(indices, jnp.int32)

            def array_step(member: int | Array, carry: Carry) -> Carry:
                return body(table[member], member, lax.switch(member, outs), carry)

        if len(indices) == 1:
            return array_step(0, carry)
        return lax.fori_loop(0, len(indices), array_step, carry)
    table = jnp.asarray(chunks, jnp.int32)

    def chunk_step(position: int | Array, carry: Carry) -> Carry:
        chunk = read_chunk(leaves, chunks, position)

        def row_step(row: Array, carry: Carry) -> Carry:
            index = table[position, row]
            flat = lax.dynamic_index_in_dim(chunk, row, keepdims=False)
            keys = sortable_keys(leaves.scores(flat))
            return body(index, position * rows + row, prepare(index, keys), carry)

        return lax.fori_loop(0, rows, row_step, carry)

    if len(chunks) == 1:
        return chunk_step(0, carry)
    return lax.fori_loop(0, len(chunks), chunk_step, carry)


def fold_arrays(leaves: Leaves, body: Callable[[Array, Array, Carry], Carry], carry: Carry,
                prepare: Callable[[Array, Array], Array] = _keys) -> Carry:
    """carry = body(index, prepare(index, keys), carry) for every array (see `fold_group`)."""
    for chunks in chunk_plan(leaves):
        carry = fold_group(leaves, chunks,
                           lambda index, _, prepared, carry: body(index, prepared, carry), carry,
                           prepare)
    return carry


def _spread(keys: Array) -> Array:
    """Bins 0 .. SPREAD - 1 by flat position, for counts that would all go to one address:
    adding to one address over and over serialises the scatter."""
    return lax.iota(jnp.int32, keys.size) & (SPREAD - 1)


def _count_into(hist: Array, bins: Array, skips: bool) -> Array:
    """hist with one added at each of `bins`. If `skips`, bins past the end (`hist.size`) are
    skipped: cheaper than counting them anywhere where nearly every bin is skipped (the branch is
    predictable), dearer than promising every bin in range where none is."""
    mode = lax.GatherScatterMode.FILL_OR_DROP if skips else lax.GatherScatterMode.PROMISE_IN_BOUNDS
    return lax.scatter_add(hist, bins[:, None], jnp.ones(bins.shape, hist.dtype), _COUNT_ONE,
                           mode=mode)


def _histogram(leaves: Leaves, bin_of: Callable[[Array, Array], Array], size: int,
               dtype: jnp.dtype, skips: bool) -> Array:
    """Counts of bin_of(array index, keys) over every array (skipping bins >= size if `skips`):
    one scatter-add pass, an array at a time (see `fold_group`): a large array's bins are made
    where it lies, and counted there too where the histogram is small."""
    def add(_: Array, bins: Array, hist: Array) -> Array:
        return _count_into(hist, bins, skips)

    return fold_arrays(leaves, add, jnp.zeros((size,), dtype), bin_of)


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

    Positions follow a golden-ratio (Weyl) sequence over the flat index, the same in every array
    of a group (see `chunk_plan`): spread evenly, cheap to compile, and deterministic; a poor
    sample costs speed, never exactness.
    """
    parts = []
    for group in _groups(leaves):
        size = leaves.size(group[0])
        count = max(1, round(sample_size * size / leaves.total))
        fraction = ((np.arange(count, dtype=np.uint64) * 0x9E3779B9) % 2**32) / 2**32
        positions = jnp.asarray(np.minimum((fraction * size).astype(np.int32), size - 1)[:, None])
        values = lax.concatenate([lax.gather(leaves.rows[i], positions, _ROW_ELEMENTS, (1, 1),
                                             mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
                                  for i in group], 0)
        parts.append(sortable_keys(leaves.scores(values)))
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
    def bin_of(_: Array, keys: Array) -> Array:
        spread = _spread(keys)
        past = (COARSE_BLOCKS + spread).astype(jnp.uint32)
        block = jnp.minimum((keys - lo) >> shift, past).astype(jnp.int32)
        return jnp.where(keys < lo, spread, SPREAD + block)

    return _histogram(leaves, bin_of, COARSE_BLOCKS + 2 * SPREAD, dtype, skips=False)


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

    def bin_of(index: Array, keys: Array) -> Array:
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

    return _histogram(leaves, bin_of, size, dtype, skips=True)


def _leaf_ties(leaves: Leaves, thresholds: Array, dtype: jnp.dtype) -> Array:
    """(levels, leaves) counts of keys equal to each threshold: one pass (it runs only where the
    fine pass could not count per leaf)."""
    def count(index: Array, keys: Array, counts: Array) -> Array:
        ties = jnp.sum(keys[None] == thresholds[:, None], axis=1, dtype=dtype)
        return lax.dynamic_update_index_in_dim(counts, ties, index, 1)

    return fold_arrays(leaves, count, jnp.zeros((thresholds.shape[0], len(leaves)), dtype))


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

    plan = chunk_plan(leaves)
    # Where each array lies: its group, and its position within the group.
    group_of = np.full(len(leaves) + 1, len(plan), np.int32)
    member_of = np.zeros(len(leaves) + 1, np.int32)
    for g, chunks in enumerate(plan):
        members = [i for chunk in chunks for i in chunk]
        group_of[members] = g
        member_of[members] = np.arange(len(members))

    def cut_in(chunks: list[list[int]], level: Array) -> Array:
        # Only the cut leaf's chunk is read.
        member, rows = jnp.asarray(member_of)[leaf[level]], len(chunks[0])
        flat = lax.dynamic_index_in_dim(read_chunk(leaves, chunks, member // rows),
                                        member % rows, keepdims=False)
        ties = (sortable_keys(leaves.scores(flat)) == thresholds[level]).astype(dtype)
        return _kth_bin(ties, quota[level], _row_length(ties.size))[0].astype(dtype)

    def level_cut(level: Array, cuts: Array) -> Array:
        branches = [lambda c=c: cut_in(c, level) for c in plan] + [lambda: jnp.zeros((), dtype)]
        return cuts.at[level].set(lax.switch(jnp.asarray(group_of)[leaf[level]], branches))

    cuts = lax.cond(jnp.any(partial),
                    lambda: lax.fori_loop(0, levels, level_cut, jnp.zeros((levels,), dtype)),
                    lambda: jnp.zeros((levels,), dtype))
    return leaf, cuts


class Selection(NamedTuple):
    """Where the lowest scores stop, for each count to remove: an element is kept iff its key
    exceeds `thresholds[level]`, or equals it at a flat position past `last_removed[array,
    level]` (-1: every tie in that array is kept)."""

    thresholds: Array
    last_removed: Array


def selection(leaves: Leaves, counts: Array) -> Selection:
    """The selection removing the `counts` lowest scores (ascending, 0 <= count <= total)."""
    ks = jnp.maximum(counts, 1)
    thresholds, below, equal, leaf_ties = kth_keys(leaves, ks)
    cut_leaf, cut_index = _tie_cuts(leaves, thresholds, ks - below, equal, leaf_ties)

    # Tied weights at flat positions up to `last_removed` go: all of them in leaves before the
    # cut, none after it (nor when nothing is removed, where the threshold is the smallest key).
    index = np.arange(len(leaves))[:, None]
    sizes = np.asarray([leaves.size(i) for i in range(len(leaves))])[:, None]
    last_removed = jnp.where(index < cut_leaf, sizes - 1,
                             jnp.where(index == cut_leaf, cut_index.astype(jnp.int32), -1))
    return Selection(thresholds, jnp.where(counts == 0, -1, last_removed))


def level_count_dtype(levels: int) -> jnp.dtype:
    """The dtype that counts up to `levels` levels: uint8 up to 255 (one byte a weight), else
    int32."""
    return jnp.dtype(jnp.uint8 if levels <= 255 else jnp.int32)


def group_rows(arrays: Sequence[Array]) -> tuple[np.ndarray, ...] | None:
    """Each array's position among the arrays of its size and dtype (its group, see
    `chunk_plan`), as separate int32 scalars to pass to a jitted program as arguments (see
    `level_counts`); None if any array is traced (the caller is itself being jitted, and the
    positions would be constants there)."""
    if any(isinstance(a, jax.core.Tracer) for a in arrays):
        return None
    seen: dict[tuple[int, jnp.dtype], int] = {}
    rows = []
    for a in arrays:
        group = (a.size, a.dtype)
        rows.append(np.int32(seen.get(group, 0)))
        seen[group] = seen.get(group, 0) + 1
    return tuple(rows)


def level_counts(leaves: Leaves, chosen: Selection,
                 rows: Sequence[Array] | None) -> list[Array]:
    """Per array, in its shape, how many levels of `chosen` keep each element (see
    `level_count_dtype`). Kept masks nest, so level i keeps an element iff its count exceeds i.

    `rows` are `group_rows` of the arrays, arguments of the jitted program and so values there
    rather than constants. Small arrays are counted in a loop (see `fold_group`) into one (arrays,
    size) array per group, one byte a weight, and each array's counts are read back at its row;
    large ones are counted one by one, each reading its levels' last removed positions at its
    row. Either way, every array of a shape costs the same kernel, which XLA compiles once.
    Without `rows` (under an outer jit), every array is counted on its own.
    """
    dtype = level_count_dtype(chosen.thresholds.shape[0])

    def count(last: Array, keys: Array) -> Array:
        position = lax.iota(jnp.int32, keys.size)
        # Kept: above the threshold, or equal to it past the last removed position.
        kept = keys[None] >= chosen.thresholds[:, None] + (position <= last[:, None])
        return jnp.sum(kept, axis=0, dtype=dtype)

    out: list[Array | None] = [None] * len(leaves)
    for chunks in chunk_plan(leaves):
        members = [i for chunk in chunks for i in chunk]
        if rows is None or len(chunks[0]) == 1:
            lasts = chosen.last_removed[np.asarray(members)]
            for member, index in enumerate(members):
                last = lax.dynamic_index_in_dim(lasts, member if rows is None else rows[index],
                                                keepdims=False)
                out[index] = count(last, sortable_keys(leaves.flat(index))).reshape(
                    leaves.shapes[index])
            continue

        def put(index: Array, member: Array, keys: Array, stacked: Array) -> Array:
            counts = count(chosen.last_removed[index], keys)
            return lax.dynamic_update_index_in_dim(stacked, counts, member, 0)

        stacked = fold_group(leaves, chunks, put,
                             jnp.zeros((len(members), leaves.size(members[0])), dtype))
        for index in members:
            out[index] = lax.dynamic_index_in_dim(stacked, rows[index], keepdims=False).reshape(
                leaves.shapes[index])
    return out


@jax.jit
def _kept_masks(leaves: Leaves, counts: Array,
                rows: Sequence[Array] | None) -> list[list[Array]]:
    """Kept masks, one list of per-array masks for each count; `rows` as `level_counts` takes."""
    per_array = level_counts(leaves, selection(leaves, counts), rows)
    return [[count > level for count in per_array] for level in range(counts.shape[0])]


def kept_level_counts(leaves: Leaves, counts: Array,
                      rows: Sequence[Array] | None) -> list[Array]:
    """Per array, in its shape, how many of the kept masks for `counts` keep each element (see
    `level_count_dtype`): `_kept_masks`' masks added, without making them; `rows` as
    `level_counts` takes."""
    return level_counts(leaves, selection(leaves, counts), rows)


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
        return _kept_masks(Leaves(arrays, transform), counts_array, group_rows(arrays))
    rows = group_rows(arrays)  # zero-size arrays are groups of their own
    selected = (_kept_masks(Leaves([arrays[i] for i in filled], transform), counts_array,
                            None if rows is None else tuple(rows[i] for i in filled))
                if filled else [[] for _ in counts])
    return [_with_empty_masks(arrays, filled, level) for level in selected]


def _with_empty_masks(arrays: list[Array], filled: list[int], masks: list[Array]) -> list[Array]:
    """`masks` at the positions `filled` of `arrays`, an empty bool mask at the others."""
    by_position = dict(zip(filled, masks, strict=True))
    return [by_position[i] if i in by_position else jnp.ones(a.shape, jnp.bool_)
            for i, a in enumerate(arrays)]
