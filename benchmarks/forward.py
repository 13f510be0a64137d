"""Forward throughput of es_jax (jitted) against transformers' PyTorch on the same CPU.

    python benchmarks/forward.py                      # MiniLM 32 x 128 and SmolLM2 8 x 256
    python benchmarks/forward.py --models minilm --rounds 5

Both frameworks run the same weights on the same random token batch. Rounds alternate between the
two so that load from other processes hits both alike; each reports the median time of its rounds
after one warm-up call (which includes jit compilation for es_jax). Prints sequences per second and
the ratio es_jax / PyTorch (goal: at least 1.0).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import machine
import numpy as np
import torch
import transformers
from flax import nnx

from es_jax import models

SHAPES = {"minilm": (32, 128), "smollm2": (8, 256)}


def call_seconds(run: Callable[[], object], rounds: int) -> list[float]:
    """Wall-clock seconds of each of `rounds` calls of `run`."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def torch_twin(model: nnx.Module, torch_class: type) -> torch.nn.Module:
    """The transformers PyTorch model holding exactly `model`'s weights (via an HF export)."""
    with tempfile.TemporaryDirectory() as folder:
        models.export(model, folder)
        return torch_class.from_pretrained(folder, dtype=torch.float32).eval()


def runners(name: str, batch: int, length: int) -> tuple[Callable, Callable]:
    """(es_jax forward, PyTorch forward) closures on one random batch for a bundled model."""
    model, _ = models.load(name)
    torch_class = transformers.BertModel if name == "minilm" else transformers.LlamaForCausalLM
    theirs = torch_twin(model, torch_class)
    vocab = model.config.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, size=(batch, length))
    mask = np.ones_like(ids)

    @nnx.jit
    def forward(model, input_ids, attention_mask):
        return model(input_ids, attention_mask=attention_mask)

    jax_ids, jax_mask = jnp.asarray(ids), jnp.asarray(mask)
    torch_ids, torch_mask = torch.tensor(ids), torch.tensor(mask)

    def run_jax():
        return jax.block_until_ready(forward(model, jax_ids, jax_mask))

    def run_torch():
        with torch.inference_mode():
            return theirs(input_ids=torch_ids, attention_mask=torch_mask)

    return run_jax, run_torch


def benchmark(name: str, rounds: int) -> float:
    """Prints the throughput of both frameworks for one model; returns the es_jax/PyTorch ratio."""
    batch, length = SHAPES[name]
    run_jax, run_torch = runners(name, batch, length)
    run_jax()
    run_torch()
    jax_times, torch_times = [], []
    for _ in range(rounds):
        jax_times += call_seconds(run_jax, 1)
        torch_times += call_seconds(run_torch, 1)
    jax_rate = batch / statistics.median(jax_times)
    torch_rate = batch / statistics.median(torch_times)
    ratio = jax_rate / torch_rate
    print(
        f"{name:8s} batch {batch} x {length}: es_jax {jax_rate:8.2f} seq/s | "
        f"PyTorch {torch_rate:8.2f} seq/s | ratio {ratio:.2f}x"
    )
    return ratio


def main() -> None:
    """Parses the flags and runs the benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="minilm,smollm2", help="comma-separated: minilm,smollm2"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per framework")
    args = parser.parse_args()
    before = machine.describe()
    print(f"jax devices: {jax.device_count()} {jax.devices()[0].platform}; torch threads: "
          f"{torch.get_num_threads()}")
    for name in args.models.split(","):
        benchmark(name.strip(), args.rounds)
    machine.report(before)


if __name__ == "__main__":
    main()
