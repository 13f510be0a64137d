"""What Wanda costs on SmolLM2, as multiples of one forward pass over the same calibration set.

    .venv/bin/python benchmarks/wanda.py [--blocks 16] [--length 256] [--rounds 3]

Times, after a warm-up call of each: one jitted forward pass of SmolLM2 over the calibration
batches (the unit); Wanda's scores as the sweep computes them (`models.activation_norms` over the
same batches, then `pruning.wanda`); and Wanda as its reference runs it, block by block with
inputs through the pruned blocks (`models.prune_sequential(..., "wanda", sparsity=0.5)`).
Rounds alternate between the three; medians are printed with the machine they ran on.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import machine
from flax import nnx

from es_jax import models, pruning
from es_jax.evaluate import tasks


def seconds(fn: Callable[[], object]) -> float:
    """Wall seconds of one call, its results ready."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main() -> None:
    """Times the forward pass, Wanda's scores and sequential Wanda; prints the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=16, help="calibration blocks")
    parser.add_argument("--length", type=int, default=256, help="tokens per block")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    before = machine.describe()

    model, tokenizer = models.load("smollm2")
    batches = tasks.calibration_batches(tokenizer, "", args.length, args.blocks, 4)
    params = nnx.state(model, nnx.Param)
    where = models.prunable(model)

    @nnx.jit
    def logits(model, batch):
        return model(batch["input_ids"], batch["attention_mask"])

    device_batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
    runs = {
        "forward pass": lambda: [logits(model, b) for b in device_batches],
        "Wanda scores (norms + |W| * ||X||)": lambda: pruning.wanda(
            params, models.activation_norms(model, device_batches), where=where),
        "Wanda block by block, 50%": lambda: models.prune_sequential(
            model, device_batches, "wanda", sparsity=0.5),
    }
    first = {name: seconds(run) for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(seconds(run))
    unit = statistics.median(times["forward pass"])
    tokens = args.blocks * args.length
    print(f"SmolLM2-135M, calibration {args.blocks} x {args.length} = {tokens:,} tokens; "
          f"medians of {args.rounds} alternating rounds")
    print("| what | seconds | x forward pass | first call (compiles) |")
    print("|---|---|---|---|")
    for name in runs:
        median = statistics.median(times[name])
        print(f"| {name} | {median:.2f} | {median / unit:.2f}x | {first[name]:.2f} s |")
    machine.report(before)


if __name__ == "__main__":
    main()
