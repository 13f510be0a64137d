"""Exact k-th smallest score across many arrays, without concatenating or sorting them.

Scores are mapped to order-preserving 32-bit keys. A random sample of the keys estimates each
requested k-th key; one pass then scatters every key into a histogram that counts, key by key, a
window of WINDOW keys around each estimate, and each gap between windows as a single bin. A k-th key
that falls in a window is found exactly. If the sample missed (the k-th key lies in a gap, which is
rare), two data-independent passes find it instead (a histogram of 2**16-key blocks, then a window
on the right block). So any number of sparsity levels costs one pass over the weights in practice,
the only cross-device traffic is a histogram, and no copy of the weights is concatenated.

Ties are broken by leaf order, then by flat index: the elements removed for k are the first k in the
order (key, leaf, flat index), so the count is exact and masks for increasing k are nested.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

BLOCK_BITS = 16
NUM_BLOCKS = 1 << (32 - BLOCK_BITS)
WINDOW = 1 << 19
SAMPLE_SIZE = 1 << 18
_TOP = np.uint32(2**32 - WINDOW)


def sortable_keys(scores: Array) -> Array:
    """Order-preserving uint32 keys of float scores (bf16/fp16 widen exactly; -0.0 ties 0.0)."""
    x = scores.astype(jnp.float32)
    x = jnp.where(x == 0, jnp.float32(0), x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def count_dtype(total: int) -> jnp.dtype:
    """The integer dtype that holds counts up to `total`."""
    if jax.config.jax_enable_x64:
        return jnp.dtype(jnp.int64)
    if total < 2**32:
        return jnp.dtype(jnp.uint32)
    raise ValueError(f"{total} target weights do not fit 32-bit counts; enable 64-bit counting "
                     f"with jax.config.update('jax_enable_x64', True)")


def _sample(keys: Sequence[Array], sample_size: int) -> Array:
    """A sorted sample of the keys, each array sampled in proportion to its size.

    Positions follow a golden-ratio (Weyl) sequence over the flat index: spread evenly, cheap to
    compile, and deterministic; a poor sample costs speed, never exactness.
    """
    total = sum(k.size for k in keys)
    parts = []
    for index, leaf_keys in enumerate(keys):
        count = max(1, round(sample_size * leaf_keys.size / total))
        steps = jnp.arange(count, dtype=jnp.uint32) + jnp.uint32(index * 7919)
        fraction = (steps * jnp.uint32(0x9E3779B9)).astype(jnp.float32) * (1.0 / 2**32)
        positions = jnp.minimum((fraction * leaf_keys.size).astype(jnp.int32), leaf_keys.size - 1)
        parts.append(leaf_keys.reshape(-1)[positions])
    return jnp.sort(jnp.concatenate(parts))


def _disjoint(starts: Array) -> Array:
    """Ascending window starts, each pushed to at least one window past the previous one."""
    out = [starts[0]]
    for start in starts[1:]:
        earliest = jnp.where(out[-1] > _TOP - WINDOW, _TOP, out[-1] + WINDOW)
        out.append(jnp.maximum(start, earliest))
    return jnp.stack(out)


def _window_starts(sample: Array, total: int, ks: Array) -> Array:
    """One window of keys per k, centred on the sample's estimate of the k-th key."""
    m = sample.size
    rank = jnp.round(ks.astype(jnp.float32) * (m / total)).astype(jnp.int32) - 1
    estimates = sample[jnp.clip(rank, 0, m - 1)]
    starts = jnp.maximum(estimates, WINDOW // 2) - WINDOW // 2
    return _disjoint(jnp.minimum(starts, _TOP))


def _windowed_histogram(keys: Sequence[Array], starts: Array, dtype: jnp.dtype) -> Array:
    """One pass: per-key counts inside each window, one count for each gap between windows.

    Bin layout, in key order: gap 0, window 0 (WINDOW bins), gap 1, window 1, ..., gap L.
    """
    levels = starts.shape[0]
    hist = jnp.zeros((levels * (WINDOW + 1) + 1,), dtype)
    for leaf_keys in keys:
        flat = leaf_keys.reshape(-1)
        index = jnp.zeros(flat.shape, jnp.int32)
        for level in range(levels):
            offset = flat - starts[level]
            in_window = level * (WINDOW + 1) + 1 + jnp.minimum(offset, WINDOW).astype(jnp.int32)
            index = jnp.where(flat >= starts[level], in_window, index)
        # Bins are in range by construction; promising so skips XLA's per-update bounds handling.
        hist = hist.at[index].add(jnp.ones((), dtype), mode="promise_in_bounds")
    return hist


def _windowed_kth(hist: Array, starts: Array, k: Array) -> tuple[Array, ...]:
    """The k-th key from a windowed histogram: (found, key, count below it, count equal)."""
    cumulative = jnp.cumsum(hist)
    position = jnp.searchsorted(cumulative, k, side="left").astype(jnp.int32)
    level, within = position // (WINDOW + 1), position % (WINDOW + 1)
    found = within > 0
    key = starts[jnp.minimum(level, starts.shape[0] - 1)] + (within - 1).astype(jnp.uint32)
    below = jnp.where(position > 0, cumulative[jnp.maximum(position - 1, 0)], 0)
    return found, key, below.astype(hist.dtype), hist[position]


def _block_histogram(keys: Sequence[Array], dtype: jnp.dtype) -> Array:
    """One pass: counts of keys per block of 2**BLOCK_BITS consecutive keys."""
    hist = jnp.zeros((NUM_BLOCKS,), dtype)
    for leaf_keys in keys:
        block = (leaf_keys.reshape(-1) >> BLOCK_BITS).astype(jnp.int32)
        hist = hist.at[block].add(jnp.ones((), dtype), mode="promise_in_bounds")
    return hist


def _radix_kth(keys: Sequence[Array], k_array: Array, dtype: jnp.dtype) -> tuple[Array, ...]:
    """Two data-independent passes: each k-th key's block, then a window starting on that block."""
    cumulative = jnp.cumsum(_block_histogram(keys, dtype))
    block = jnp.searchsorted(cumulative, k_array, side="left").astype(jnp.uint32)
    starts = _disjoint(jnp.minimum(block << BLOCK_BITS, _TOP))
    hist = _windowed_histogram(keys, starts, dtype)
    _, key, below, equal = jax.vmap(lambda k: _windowed_kth(hist, starts, k))(k_array)
    return key, below, equal


def kth_keys(keys: Sequence[Array], ks: Array) -> tuple[Array, Array, Array]:
    """For ascending ks (1 <= k <= size): the k-th key, the count below it, the count equal."""
    total = sum(k.size for k in keys)
    starts = _window_starts(_sample(keys, min(SAMPLE_SIZE, 4 * total)), total, ks)
    hist = _windowed_histogram(keys, starts, ks.dtype)
    found, key, below, equal = jax.vmap(lambda k: _windowed_kth(hist, starts, k))(ks)
    return lax.cond(jnp.all(found), lambda: (key, below, equal),
                    lambda: _radix_kth(keys, ks, ks.dtype))


def _remove_tied(kept: list[Array], keys: Sequence[Array], threshold: Array,
                 ties_to_remove: Array) -> list[Array]:
    """Removes the first `ties_to_remove` threshold-tied elements, in leaf then flat-index order.

    Only the one leaf where the quota runs out needs a running count of its ties.
    """
    dtype = ties_to_remove.dtype
    per_leaf = jnp.stack([jnp.sum(k == threshold, dtype=dtype) for k in keys])
    before = jnp.cumsum(per_leaf) - per_leaf
    quotas = jnp.minimum(jnp.maximum(ties_to_remove, before) - before, per_leaf)

    def leaf_mask(mask: Array, leaf_keys: Array, quota: Array, ties: Array) -> Array:
        def partial() -> Array:
            tied = leaf_keys.reshape(-1) == threshold
            first = tied & (jnp.cumsum(tied, dtype=dtype) <= quota)
            return mask & ~first.reshape(mask.shape)

        def whole() -> Array:
            return mask & ~((leaf_keys == threshold) & (quota > 0))

        return lax.cond((quota > 0) & (quota < ties), partial, whole)

    return [leaf_mask(m, k, q, t) for m, k, q, t in zip(kept, keys, quotas, per_leaf, strict=True)]


@jax.jit
def _kept_masks(scores: list[Array], counts: Array) -> list[list[Array]]:
    """Jitted body of `kept_masks`: one compilation per layout and number of levels."""
    keys = [sortable_keys(s) for s in scores]
    thresholds, below, equal = kth_keys(keys, jnp.maximum(counts, 1))

    def level_masks(level: tuple[Array, ...]) -> list[Array]:
        threshold, count, below, equal = level
        ties_to_remove = jnp.maximum(count, 1) - below
        all_ties_go = ties_to_remove >= equal
        kept = [(k > threshold) | ((k == threshold) & ~all_ties_go) for k in keys]
        kept = lax.cond(all_ties_go, lambda kept, *_: kept,
                        lambda kept, threshold, ties: _remove_tied(kept, keys, threshold, ties),
                        kept, threshold, ties_to_remove)
        return [mask | (count == 0) for mask in kept]

    # One loop body for all levels keeps the compiled program the size of a single level's.
    stacked = lax.map(level_masks, (thresholds, counts, below, equal))
    return [[leaf[level] for leaf in stacked] for level in range(counts.shape[0])]


def kept_masks(scores: Sequence[Array], counts_to_remove: Sequence[int]) -> list[list[Array]]:
    """Bool kept-masks (one list of per-array masks per count) removing the lowest scores.

    Counts must be ascending, between 0 (keep everything) and the total size.
    """
    total = sum(int(jnp.size(s)) for s in scores)
    if list(counts_to_remove) != sorted(counts_to_remove):
        raise ValueError(f"counts to remove must be ascending, got {list(counts_to_remove)}")
    if counts_to_remove and not 0 <= counts_to_remove[0] <= counts_to_remove[-1] <= total:
        raise ValueError(f"counts to remove must lie in [0, {total}], got {list(counts_to_remove)}")
    counts = jnp.asarray(list(counts_to_remove), count_dtype(total))
    return _kept_masks([jnp.asarray(s) for s in scores], counts)
