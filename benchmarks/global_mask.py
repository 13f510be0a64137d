"""Exact global magnitude mask over BERT-base's target set, against its baselines, in one run;
and the first call's compile time by number of matrices.

    .venv/bin/python benchmarks/global_mask.py [--repeats 5] [--skip-slow] [--counts 72,210,560]

84,934,656 fp32 weights (12 layers x (4 x 768x768 + 2 x 768x3072)). Prints seconds and the ratio to
the floor (one jitted pass over |w|) for: es_jax's exact global mask, a 9-level nested sweep, a
`jnp.sort`-based threshold, numpy's `partition`, and torch's `global_unstructured` where installed;
and the scratch memory XLA allocates for the mask, in bytes per weight. The mask is computed as
`pruning.omp` does, |w| inside the selection; a mask of a stored |w| tree is timed beside it. The
eager calls the README shows (`omp`, `unstructured(magnitude(...))`) are timed beside their jitted
forms.

Then, for trees of 72 (BERT-base), 210 (SmolLM2) and 560 (a 70B Llama) small matrices of a Llama
block's seven shapes, the first call of `levels`, `unstructured` and `omp` at 9 levels: its time,
the time of a second call, their difference (tracing and compiling), the compile time of the same
call inside the caller's `jax.jit`, and the compile time of a program that only writes the same
outputs (XLA's own cost per output array), each also as a ratio to the 72-matrix tree's.
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
# A Llama block's q, k, v, o, gate, up and down projections, small: (hidden, kv, ffn) = (32, 8, 88).
BLOCK = [(32, 32), (32, 8), (32, 8), (32, 32), (32, 88), (32, 88), (88, 32)]


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


def once(fn: Callable[[], object]) -> float:
    """Wall time of one call of `fn`, until its results are ready."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def block_tree(matrices: int) -> dict[str, dict[str, jax.Array]]:
    """`matrices` random matrices of BLOCK's shapes, in blocks of seven, with a bias each (not a
    target of the default selector)."""
    key = jax.random.PRNGKey(1)
    return {f"block{i // 7:03d}/m{i % 7}": {
        "kernel": jax.random.normal(jax.random.fold_in(key, i), BLOCK[i % 7]),
        "bias": jnp.zeros(BLOCK[i % 7][1])} for i in range(matrices)}


CALLS: dict[str, Callable] = {
    "levels": lambda t: pruning.levels(pruning.magnitude(t), LEVELS),
    "unstructured": lambda t: pruning.unstructured(pruning.magnitude(t), LEVELS),
    "omp": lambda t: pruning.omp(t, LEVELS),
}
# What each call writes, and nothing else: one uint8 array, 9 masks, 9 masks and 9 pruned arrays
# a matrix.
OUTPUTS_ALONE: dict[str, Callable] = {
    "levels": lambda t: [(jnp.abs(m["kernel"]) * 9).astype(jnp.uint8) for m in t.values()],
    "unstructured": lambda t: [[jnp.abs(m["kernel"]) > 0.1 * i for m in t.values()]
                               for i in range(len(LEVELS))],
    "omp": lambda t: [[(jnp.abs(m["kernel"]) > 0.1 * i,
                        jnp.where(jnp.abs(m["kernel"]) > 0.1 * i, m["kernel"], 0))
                       for m in t.values()] for i in range(len(LEVELS))],
}


def compile_times(matrices: int, name: str) -> dict[str, float]:
    """Seconds for `CALLS[name]` on a tree of `matrices` matrices: the first eager call, a second
    one, the compile of the call inside `jax.jit`, and the compile of its outputs alone. Every
    cache is emptied first, so the first call traces and compiles all it runs."""
    jax.clear_caches()
    tree = block_tree(matrices)
    jax.block_until_ready(tree)
    first = once(lambda: CALLS[name](tree))
    again = once(lambda: CALLS[name](tree))
    jitted = jax.jit(CALLS[name]).lower(tree)
    start = time.perf_counter()
    jitted.compile()
    in_jit = time.perf_counter() - start
    alone = jax.jit(OUTPUTS_ALONE[name]).lower(tree)
    start = time.perf_counter()
    alone.compile()
    return {"first": first, "again": again, "compile": first - again, "in_jit": in_jit,
            "alone": time.perf_counter() - start}


def compile_table(counts: list[int]) -> None:
    """Prints `compile_times` for every call and number of matrices, with ratios to the first
    number's."""
    print(f"\nfirst call at {len(LEVELS)} levels by number of matrices (small, {len(BLOCK)} "
          "shapes); seconds, and in () the ratio to the call's first row (goal <= 2x)")
    print(f"{'call':<13} {'matrices':>8} {'first call':>16} {'again':>7} {'compile':>16} "
          f"{'in caller jit':>16} {'outputs alone':>16}")
    compile_times(len(BLOCK), "omp")  # warms JAX up: its first compile ever costs more
    for name in CALLS:
        base = None
        for count in counts:
            times = compile_times(count, name)
            base = base or times

            def cell(key: str, times: dict[str, float] = times, base: dict = base) -> str:
                return f"{times[key]:7.2f} ({times[key] / base[key]:4.1f}x)"

            print(f"{name:<13} {count:>8} {cell('first'):>16} {times['again']:>7.3f} "
                  f"{cell('compile'):>16} {cell('in_jit'):>16} {cell('alone'):>16}", flush=True)


def eager_rows(params: dict[str, jax.Array], repeats: int) -> list[tuple[str, float]]:
    """The README's eager calls on BERT-base with biases beside the kernels, and their jitted
    forms."""
    tree = {name: {"kernel": w, "bias": jnp.zeros(w.shape[1])} for name, w in params.items()}
    where = r".*kernel"
    omp_jit = jax.jit(lambda t: pruning.omp(t, 0.5, where=where))
    stored_jit = jax.jit(lambda t: pruning.unstructured(pruning.magnitude(t, where), 0.5))
    return [
        ("omp, eager", seconds(lambda: pruning.omp(tree, 0.5, where=where), repeats)),
        ("omp, jitted", seconds(lambda: omp_jit(tree), repeats)),
        ("unstructured(magnitude), eager",
         seconds(lambda: pruning.unstructured(pruning.magnitude(tree, where), 0.5), repeats)),
        ("unstructured(magnitude), jitted", seconds(lambda: stored_jit(tree), repeats)),
    ]


def main() -> None:
    """Runs every method on the same weights and prints a table of ratios to the floor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-slow", action="store_true", help="skip jnp.sort and torch")
    parser.add_argument("--counts", default="72,210,560",
                        help="numbers of matrices for the compile table ('' to skip it)")
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

    eager = eager_rows(params, args.repeats)
    rows += eager
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
    print(f"eager / jitted: omp {eager[0][1] / eager[1][1]:.2f}x, unstructured(magnitude) "
          f"{eager[2][1] / eager[3][1]:.2f}x (goal <= 1.5x); eager omp / floor "
          f"{eager[0][1] / base:.1f}x (goal <= 10x, limit 15x)")

    for name, fn in (("|w| inside the selection", one_mask),
                     ("|w| stored in the same program", stored)):
        analysis = fn.lower(params).compile().memory_analysis()
        if analysis is not None:
            scratch = analysis.temp_size_in_bytes
            print(f"XLA scratch for one mask, {name}: {scratch / 2**20:.1f} MiB = "
                  f"{scratch / n:.2f} bytes/weight (output mask "
                  f"{analysis.output_size_in_bytes / n:.2f} bytes/weight)")
    if args.counts:
        compile_table([int(count) for count in args.counts.split(",")])
    machine.report(before)


if __name__ == "__main__":
    main()
