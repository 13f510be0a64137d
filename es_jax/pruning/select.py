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
    """A sorted random sample of the keys, each array sampled in proportion to its size."""
    total = sum(k.size for k in keys)
    parts = []
    for index, leaf_keys in enumerate(keys):
        count = max(1, round(sample_size * leaf_keys.size / total))
        rng = jax.random.fold_in(jax.random.PRNGKey(0), index)
        positions = jax.random.randint(rng, (count,), 0, leaf_keys.size)
        parts.append(leaf_keys.reshape(-1)[positions])
    return jnp.sort(jnp.concatenate(parts))


def _disjoint(starts: Array) -> Array:
    """Ascending window starts, each pushed to at least one window past the previous one."""
    out = [starts[0]]
    for start in starts[1:]:
        earliest = jnp.where(out[-1] > _TOP - WINDOW, _TOP, out[-1] + WINDOW)
        out.append(jnp.maximum(start, earliest))
    return jnp.stack(out)


def _window_starts(sample: Array, total: int, ks: Sequence[int]) -> Array:
    """One window of keys per k, centred on the sample's estimate of the k-th key."""
    m = sample.size
    estimates = jnp.stack([sample[min(m - 1, max(0, round(k / total * m) - 1))] for k in ks])
    starts = jnp.maximum(estimates, WINDOW // 2) - WINDOW // 2
    return _disjoint(jnp.minimum(starts, _TOP))


def _windowed_histogram(keys: Sequence[Array], starts: Array, dtype: jnp.dtype) -> Array:
    """One pass: per-key counts inside each window, one count for each gap between windows.

    Bin layout, in key order: gap 0, window 0 (WINDOW bins), gap 1, window 1, ..., gap L.
    """
    levels = starts.shape[0]
    hist = jnp.zeros((levels * (WINDOW + 1) + 1,), dtype)
    for leaf_keys in keys:
        # The barrier orders the leaves, so one leaf's bin indices are alive at a time.
        flat, hist = lax.optimization_barrier((leaf_keys.reshape(-1), hist))
        windows_started = jnp.zeros(flat.shape, jnp.int32)
        last_start = jnp.zeros(flat.shape, jnp.uint32)
        for level in range(levels):
            started = flat >= starts[level]
            windows_started += started.astype(jnp.int32)
            last_start = jnp.where(started, starts[level], last_start)
        offset = flat - last_start
        inside = (windows_started > 0) & (offset < WINDOW)
        gap_bin = windows_started * (WINDOW + 1)
        window_bin = (windows_started - 1) * (WINDOW + 1) + 1 + offset.astype(jnp.int32)
        hist = hist.at[jnp.where(inside, window_bin, gap_bin)].add(jnp.ones((), dtype))
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
    """One pass: counts of keys per block of BLOCK_SIZE consecutive keys."""
    hist = jnp.zeros((NUM_BLOCKS,), dtype)
    for leaf_keys in keys:
        flat, hist = lax.optimization_barrier((leaf_keys.reshape(-1), hist))
        hist = hist.at[(flat >> BLOCK_BITS).astype(jnp.int32)].add(
            jnp.ones((), dtype))
    return hist


def _radix_kth(keys: Sequence[Array], k_array: Array, dtype: jnp.dtype) -> tuple[Array, ...]:
    """Two data-independent passes: each k-th key's block, then a window starting on that block."""
    cumulative = jnp.cumsum(_block_histogram(keys, dtype))
    block = jnp.searchsorted(cumulative, k_array, side="left").astype(jnp.uint32)
    starts = _disjoint(jnp.minimum(block << BLOCK_BITS, _TOP))
    hist = _windowed_histogram(keys, starts, dtype)
    _, key, below, equal = jax.vmap(lambda k: _windowed_kth(hist, starts, k))(k_array)
    return key, below, equal


def kth_keys(keys: Sequence[Array], ks: Sequence[int]) -> tuple[Array, Array, Array]:
    """For ascending ks (1 <= k <= size): the k-th key, the count below it, the count equal."""
    total = sum(k.size for k in keys)
    dtype = count_dtype(total)
    k_array = jnp.asarray(list(ks), dtype)
    starts = _window_starts(_sample(keys, min(SAMPLE_SIZE, 4 * total)), total, ks)
    hist = _windowed_histogram(keys, starts, dtype)
    found, key, below, equal = jax.vmap(lambda k: _windowed_kth(hist, starts, k))(k_array)
    return lax.cond(jnp.all(found), lambda: (key, below, equal),
                    lambda: _radix_kth(keys, k_array, dtype))


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


def kept_masks(scores: Sequence[Array], counts_to_remove: Sequence[int]) -> list[list[Array]]:
    """Bool kept-masks (one list of per-array masks per count) removing the lowest scores.

    `counts_to_remove` must be ascending; a count of 0 keeps everything.
    """
    keys = [sortable_keys(s) for s in scores]
    total = sum(k.size for k in keys)
    dtype = count_dtype(total)
    results = [[jnp.ones(s.shape, bool) for s in scores] for _ in counts_to_remove]
    active = [i for i, k in enumerate(counts_to_remove) if k > 0]
    if not active:
        return results
    thresholds, below, equal = kth_keys(keys, [counts_to_remove[i] for i in active])
    for position, level in enumerate(active):
        threshold = thresholds[position]
        ties_to_remove = jnp.asarray(counts_to_remove[level], dtype) - below[position]
        all_ties_go = ties_to_remove >= equal[position]
        kept = [(k > threshold) | ((k == threshold) & ~all_ties_go) for k in keys]
        results[level] = lax.cond(
            all_ties_go, lambda kept, *_: kept,
            lambda kept, threshold, ties: _remove_tied(kept, keys, threshold, ties),
            kept, threshold, ties_to_remove)
    return results
