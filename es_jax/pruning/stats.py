"""Statistics of parameters and masks: sparsity report, near-zero fractions, mask similarity.

Counts are taken per leaf on device and totalled in Python, so totals are exact for any model size.
Under `jax.jit` the same functions return device scalars instead of Python numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from es_jax.pruning.paths import PyTree, Selector, flatten, path_string, target_flags

Array = jax.Array


def _counts(leaves: Sequence[Array], count: Callable[[Array], Array]) -> list[Any]:
    """`count(leaf)` for every leaf: Python ints when concrete, device scalars under tracing."""
    values = [count(jnp.asarray(leaf)) for leaf in leaves]
    if any(isinstance(v, jax.core.Tracer) for v in values):
        return values
    return [int(v) for v in jax.device_get(values)]


def _fraction(part: Any, whole: Any, empty: float = 0.0) -> Any:
    """part / whole, or `empty` when whole is 0; works on Python numbers and traced scalars."""
    if isinstance(part, jax.Array) or isinstance(whole, jax.Array):
        return jnp.where(whole > 0, part / jnp.where(whole > 0, whole, 1), empty)
    return part / whole if whole else empty


def report(params: PyTree, where: Selector | None = None) -> dict[str, Any]:
    """Zeros, size and sparsity per leaf, over the target set and over the whole tree."""
    paths, leaves, _ = flatten(params)
    flags = target_flags(paths, leaves, where)
    zeros = _counts(leaves, lambda leaf: jnp.sum(leaf == 0, dtype=jnp.int32))
    per_leaf = {
        path: {"shape": tuple(jnp.shape(leaf)), "target": flag, "zeros": z,
               "size": int(jnp.size(leaf)), "sparsity": _fraction(z, int(jnp.size(leaf)))}
        for path, leaf, flag, z in zip(paths, leaves, flags, zeros, strict=True)
    }

    def total(selected: list[dict[str, Any]]) -> dict[str, Any]:
        zero_count = sum(row["zeros"] for row in selected)
        size = sum(row["size"] for row in selected)
        return {"zeros": zero_count, "size": size, "sparsity": _fraction(zero_count, size)}

    return {"target": total([r for r in per_leaf.values() if r["target"]]),
            "model": total(list(per_leaf.values())), "leaves": per_leaf}


def format_report(summary: dict[str, Any], targets_only: bool = True) -> str:
    """The report as a printable table (per leaf, then the target set and the whole tree)."""
    rows = [(path, row) for path, row in summary["leaves"].items()
            if row["target"] or not targets_only]
    width = max([len(p) for p, _ in rows] + [len("whole tree")])
    lines = [f"{'leaf':<{width}}  {'shape':>16}  {'zeros':>12}  {'sparsity':>8}"]
    for path, row in rows:
        shape = "x".join(str(d) for d in row["shape"]) or "()"
        lines.append(f"{path:<{width}}  {shape:>16}  {row['zeros']:>12,}  {row['sparsity']:>8.2%}")
    lines.append("-" * len(lines[0]))
    for name, key in (("target set", "target"), ("whole tree", "model")):
        row = summary[key]
        lines.append(f"{name:<{width}}  {row['size']:>16,}  {row['zeros']:>12,}  "
                     f"{row['sparsity']:>8.2%}")
    return "\n".join(lines)


def near_zero(params: PyTree, thresholds: Sequence[float], where: Selector | None = None,
              relative: bool = False) -> dict[str, Any]:
    """Fraction of weights with |w| below each threshold (times each leaf's std if `relative`).

    Returned per target leaf, over the target set, and over every floating-point leaf of the tree.
    """
    paths, leaves, _ = flatten(params)
    flags = target_flags(paths, leaves, where)
    floating = [jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating) for leaf in leaves]

    def below(threshold: float) -> Callable[[Array], Array]:
        def count(leaf: Array) -> Array:
            bound = threshold * jnp.std(leaf.astype(jnp.float32)) if relative else threshold
            return jnp.sum(jnp.abs(leaf.astype(jnp.float32)) < bound, dtype=jnp.int32)
        return count

    float_leaves = [leaf for leaf, f in zip(leaves, floating, strict=True) if f]
    float_paths = [path for path, f in zip(paths, floating, strict=True) if f]
    float_flags = [flag for flag, f in zip(flags, floating, strict=True) if f]
    sizes = [int(jnp.size(leaf)) for leaf in float_leaves]
    counts = [_counts(float_leaves, below(t)) for t in thresholds]
    target_size = sum(s for s, flag in zip(sizes, float_flags, strict=True) if flag)
    return {
        "thresholds": list(thresholds),
        "relative": relative,
        "target": [_fraction(sum(c for c, flag in zip(level, float_flags, strict=True) if flag),
                             target_size) for level in counts],
        "model": [_fraction(sum(level), sum(sizes)) for level in counts],
        "leaves": {path: [_fraction(level[i], sizes[i]) for level in counts]
                   for i, (path, flag) in enumerate(zip(float_paths, float_flags, strict=True))
                   if flag},
    }


def _aligned_masks(mask_a: PyTree, mask_b: PyTree) -> tuple[list[Array], list[Array]]:
    """The target entries of two masks, leaf by leaf; refuses masks of different layouts."""
    def leaves(mask: PyTree) -> tuple[list[Any], Any]:
        return jax.tree_util.tree_flatten_with_path(mask, is_leaf=lambda x: x is None)

    with_paths_a, treedef_a = leaves(mask_a)
    with_paths_b, treedef_b = leaves(mask_b)
    if treedef_a != treedef_b:
        raise ValueError("the two masks have different tree structures; compare masks of the "
                         "same parameters")
    out_a, out_b = [], []
    for (path, a), (_, b) in zip(with_paths_a, with_paths_b, strict=True):
        if (a is None) != (b is None) or (a is not None and jnp.shape(a) != jnp.shape(b)):
            raise ValueError(f"the masks differ in layout at {path_string(path)!r}: "
                             f"{None if a is None else jnp.shape(a)} vs "
                             f"{None if b is None else jnp.shape(b)}")
        if a is not None:
            out_a.append(jnp.asarray(a, bool))
            out_b.append(jnp.asarray(b, bool))
    if not out_a:
        raise ValueError("the masks have no target leaf")
    return out_a, out_b


def similarity(mask_a: PyTree, mask_b: PyTree) -> dict[str, Any]:
    """Cosine of the kept sets (as the paper), IoU of the pruned sets, Hamming, and chance values.

    The chance values are what two independent random masks with the same densities give in
    expectation.
    """
    a, b = _aligned_masks(mask_a, mask_b)
    size = sum(int(x.size) for x in a)
    kept_a = sum(_counts(a, lambda x: jnp.sum(x, dtype=jnp.int32)))
    kept_b = sum(_counts(b, lambda x: jnp.sum(x, dtype=jnp.int32)))
    kept_both = sum(_counts([x & y for x, y in zip(a, b, strict=True)],
                            lambda x: jnp.sum(x, dtype=jnp.int32)))
    pruned_both = size - kept_a - kept_b + kept_both
    pruned_union = size - kept_both
    density_a, density_b = kept_a / size, kept_b / size
    sparsity_a, sparsity_b = 1 - density_a, 1 - density_b
    hamming = kept_a + kept_b - 2 * kept_both
    sqrt = jnp.sqrt if isinstance(kept_a, jax.Array) else math.sqrt
    return {
        "cosine": _fraction(kept_both, sqrt(kept_a * kept_b)),
        "iou": _fraction(pruned_both, pruned_union, empty=1.0),
        "hamming": hamming,
        "hamming_fraction": hamming / size,
        "chance_cosine": sqrt(density_a * density_b),
        "chance_iou": _fraction(sparsity_a * sparsity_b,
                                sparsity_a + sparsity_b - sparsity_a * sparsity_b, empty=1.0),
        "chance_hamming_fraction": density_a * sparsity_b + density_b * sparsity_a,
        "size": size,
    }
