"""Exact global magnitude mask over BERT-base's target set, against its baselines, in one run.

    .venv/bin/python benchmarks/global_mask.py [--repeats 5] [--skip-slow]

84,934,656 fp32 weights (12 layers x (4 x 768x768 + 2 x 768x3072)). Prints seconds and the ratio to
the floor (one jitted pass over |w|) for: es_jax's exact global mask, a 9-level nested sweep, a
`jnp.sort`-based threshold, numpy's `partition`, and torch's `global_unstructured` where installed;
and the scratch memory XLA allocates for the mask, in bytes per weight. The mask is computed as
`pruning.omp` does, |w| inside the selection; a mask of a stored |w| tree is timed beside it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import machine
import numpy as np

from es_jax import pruning

SHAPES = [(768, 768)] * 4 * 12 + [(768, 3072), (3072, 768)] * 12
LEVELS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def bert_base_targets() -> dict[str, jax.Array]:
    """Random stand-ins for BERT-base's 72 target matrices, at BERT-like scale."""
    key = jax.random.PRNGKey(0)
    return {f"layer{i // 6:02d}/matrix{i % 6}":
            0.04 * jax.random.normal(jax.random.fold_in(key, i), s) for i, s in enumerate(SHAPES)}


def seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    """Runs every method on the same weights and prints a table of ratios to the floor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-slow", action="store_true", help="skip jnp.sort and torch")
    args = parser.parse_args()
    before = machine.describe()

    params = bert_base_targets()
    n = sum(w.size for w in params.values())
    print(f"{n:,} fp32 weights in {len(params)} matrices; jax {jax.__version__}, "
          f"{jax.device_count()} {jax.default_backend()} device(s)")

    floor = jax.jit(lambda p: sum(jnp.sum(jnp.abs(w)) for w in p.values()))
    # |w| computed inside the selection (as pruning.omp does), and stored first.
    one_mask = jax.jit(lambda p: pruning.unstructured(p, 0.5, transform=jnp.abs))
    stored = jax.jit(lambda p: pruning.unstructured(pruning.magnitude(p), 0.5))
    nested = jax.jit(lambda p: pruning.unstructured(p, LEVELS, transform=jnp.abs))

    def sort_threshold(p: dict[str, jax.Array]) -> dict[str, jax.Array]:
        flat = jnp.sort(jnp.concatenate([jnp.abs(w).ravel() for w in p.values()]))
        threshold = flat[round(0.5 * n) - 1]
        return {k: jnp.abs(w) > threshold for k, w in p.items()}

    rows: list[tuple[str, float]] = []
    rows.append(("floor: one jitted pass over |w|", seconds(lambda: floor(params), args.repeats)))
    rows.append(("es_jax exact global mask (50%)", seconds(lambda: one_mask(params), args.repeats)))
    rows.append((f"es_jax nested sweep ({len(LEVELS)} levels)",
                 seconds(lambda: nested(params), args.repeats)))
    rows.append(("es_jax mask (50%) of a stored |w| tree", seconds(lambda: stored(params),
                                                                   args.repeats)))
    # What any nested sweep pays at least: writing its masks (9 bytes per weight).
    write_masks = jax.jit(lambda p: [{k: jnp.abs(w) > 0.01 * level for k, w in p.items()}
                                     for level in range(len(LEVELS))])
    rows.append((f"writing {len(LEVELS)} bool masks, no selection",
                 seconds(lambda: write_masks(params), args.repeats)))

    host = {k: np.asarray(w) for k, w in params.items()}

    def numpy_partition() -> dict[str, np.ndarray]:
        flat = np.concatenate([np.abs(w).ravel() for w in host.values()])
        threshold = np.partition(flat, round(0.5 * n) - 1)[round(0.5 * n) - 1]
        return {k: np.abs(w) > threshold for k, w in host.items()}

    rows.append(("numpy partition threshold", seconds(numpy_partition, 1)))
    if not args.skip_slow:
        rows.append(("jnp.sort threshold", seconds(lambda: jax.jit(sort_threshold)(params), 1)))
        try:
            import torch
            from torch.nn.utils import prune
        except ImportError:
            print("torch not installed: skipping global_unstructured")
        else:
            def torch_global() -> None:
                modules = [torch.nn.Linear(s[0], s[1], bias=False) for s in SHAPES]
                with torch.no_grad():
                    for module, w in zip(modules, host.values(), strict=True):
                        module.weight.copy_(torch.from_numpy(w.T))
                start = time.perf_counter()
                prune.global_unstructured([(m, "weight") for m in modules],
                                          pruning_method=prune.L1Unstructured, amount=0.5)
                return time.perf_counter() - start

            torch_global()
            rows.append(("torch global_unstructured", float(np.median(
                [torch_global() for _ in range(2)]))))

    base = rows[0][1]
    one = rows[1][1]
    print(f"\n{'method':<42} {'seconds':>9} {'x floor':>8}")
    for name, value in rows:
        print(f"{name:<42} {value:>9.4f} {value / base:>8.1f}")
    print(f"\nnested sweep / one mask: {rows[2][1] / one:.2f}x (goal <= 2x)")
    print(f"exact mask / floor: {one / base:.1f}x (goal <= 10x, limit 20x)")

    for name, fn in (("|w| inside the selection", one_mask),
                     ("|w| stored in the same program", stored)):
        analysis = fn.lower(params).compile().memory_analysis()
        if analysis is not None:
            scratch = analysis.temp_size_in_bytes
            print(f"XLA scratch for one mask, {name}: {scratch / 2**20:.1f} MiB = "
                  f"{scratch / n:.2f} bytes/weight (output mask "
                  f"{analysis.output_size_in_bytes / n:.2f} bytes/weight)")
    machine.report(before)


if __name__ == "__main__":
    main()
