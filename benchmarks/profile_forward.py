"""Where a jitted forward pass spends its time, op group by op group, from the JAX profiler.

    python benchmarks/profile_forward.py                  # MiniLM 32 x 128
    python benchmarks/profile_forward.py --model smollm2 --dump /tmp/xla_dump

Compiles es_jax's forward of a bundled model on a random batch, prints XLA's FLOP count and the
achieved rate against a jitted square matmul measured in the same run, then traces a few calls
(`jax.profiler.trace`, perfetto format) and prints the time of each group of XLA ops (fusions
named alike: `ynn_fusion` = dots sent to YNNPACK with what XLA fused around them), and the
slowest single ops with their shapes from the optimised HLO. `--dump DIR` also writes XLA's HLO
dumps there (`XLA_FLAGS=--xla_dump_to` must be set before jax starts, so the script re-runs
itself with it).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

SHAPES = {"minilm": (32, 128), "smollm2": (8, 256)}


def op_times(trace_dir: str, calls: int) -> dict[str, float]:
    """Milliseconds per call of every XLA op in a perfetto trace (runtime bookkeeping left out)."""
    (path,) = Path(trace_dir).rglob("*.trace.json.gz")
    with gzip.open(path) as file:
        trace = json.load(file)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals: dict[str, float] = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or "dur" not in event:
            continue
        if name.startswith(("ThunkExecutor", "$", "end:")) or "Await" in name or "::" in name:
            continue
        totals[name] += event["dur"] / 1000 / calls
    return totals


def hlo_shapes(hlo: str) -> dict[str, str]:
    """Each instruction's result shape and source op, by name, from optimised HLO text."""
    found = {}
    for match in re.finditer(r"%(\S+) = (\S+) \S+\(.*?op_name=\"([^\"]*)\"", hlo):
        found[match.group(1)] = f"{match.group(2)}  {match.group(3)[-60:]}"
    return found


def main() -> None:
    """Parses the flags, profiles the forward and prints the breakdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=sorted(SHAPES))
    parser.add_argument("--calls", type=int, default=5, help="traced calls")
    parser.add_argument("--dump", default="", help="also write XLA's HLO dumps to this folder")
    args = parser.parse_args()
    if args.dump and "xla_dump_to" not in os.environ.get("XLA_FLAGS", ""):
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={args.dump}".strip()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "XLA_FLAGS": flags})

    import jax
    import jax.numpy as jnp
    import machine
    import numpy as np
    from flax import nnx

    from es_jax import models

    before = machine.describe()
    model, _ = models.load(args.model)
    batch, length = SHAPES[args.model]
    rows = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, length))
    ids = jnp.asarray(rows)
    mask = jnp.ones_like(ids)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask)

    compiled = forward.lower(state, ids, mask).compile()
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    seconds = machine.median_seconds(
        lambda: jax.block_until_ready(forward(state, ids, mask)), 5
    )
    square = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul_rate = 2 * 2048**3 / machine.median_seconds(
        lambda: jax.block_until_ready(matmul(square)), 5
    )
    rate = flops / seconds
    print(f"{args.model} {batch} x {length}: {1000 * seconds:.1f} ms a call, "
          f"{flops / 1e9:.1f} GFLOP (XLA's count), {rate / 1e9:.0f} GFLOP/s = "
          f"{rate / matmul_rate:.2f}x a jitted 2048^2 matmul ({matmul_rate / 1e9:.0f} GFLOP/s)")

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.calls):
                jax.block_until_ready(forward(state, ids, mask))
        times = op_times(trace_dir, args.calls)
    total = sum(times.values())
    groups: dict[str, float] = collections.Counter()
    for name, ms in times.items():
        groups[re.sub(r"\.\d+$", "", name)] += ms
    print(f"\nop time {total:.1f} ms a call, by group:")
    for name, ms in groups.most_common(12):
        print(f"  {name:36s} {ms:8.2f} ms  {100 * ms / total:5.1f}%")
    shapes = hlo_shapes(compiled.as_text())
    print("\nslowest ops (result shape, source op):")
    for name, ms in sorted(times.items(), key=lambda item: -item[1])[:12]:
        print(f"  {name:28s} {ms:7.2f} ms  {shapes.get(name, '')}")
    machine.report(before)


if __name__ == "__main__":
    main()
