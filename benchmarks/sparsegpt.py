"""SparseGPT over SmolLM2's 210 target kernels: es_jax against the same algorithm in PyTorch.

    .venv/bin/python benchmarks/sparsegpt.py [--repeats 3] [--layers N]

Real weights and real Hessians: SmolLM2-135M's q, k, v, o, gate, up and down kernels of its 30
blocks, and for each the Gram matrix of its inputs over 8 x 256 calibration tokens
(`models.activation_grams`). Each kernel is pruned on its own (one-shot, not block by block with
pruned inputs), unstructured 50% and 2:4, block size 128, dampening 0.01, in float32 on the CPU,
by `pruning.sparsegpt` and by `torch_sparsegpt` below: the same rules written the way the
reference code writes them, in PyTorch (its own threads). Rounds alternate (jax, torch, jax,
torch, ...) after a first call of each, which for es_jax includes compiling one program per
kernel shape; medians are printed with the ratio, the largest difference between the two
implementations' kernels, how many mask entries differ, the summed reconstruction errors (float32
rounding on these ill-conditioned Hessians flips near-tied selections, and a flipped weight
differs by its whole value, so the kernels' largest difference is not a rounding error; the
errors say whether either result is worse), and the machine it ran on.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import machine
import numpy as np
import torch
from flax import nnx

from es_jax import models, pruning
from es_jax.evaluate import tasks

BLOCK_SIZE = 128
DAMPENING = 0.01
SETTINGS: dict[str, dict[str, Any]] = {
    "unstructured 50%": {"sparsity": 0.5},
    "2:4": {"n": 2, "m": 4},
}


@torch.no_grad()
def torch_sparsegpt(kernel: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                    n: int | None = None, m: int | None = None, block_size: int = BLOCK_SIZE,
                    dampening: float = DAMPENING) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned kernel, kept mask), both (in, out), by the rules of `pruning.sparsegpt`, in float32.

    W = kernel.T; dead inputs get H[i, i] = 1 (their weights are not zeroed); H += lambda I with
    lambda = dampening * mean(diag(H)); U = upper Cholesky factor of H^-1. Per block: the
    unstructured mask prunes the round(s * rows * columns) lowest W1^2 / diag(U)^2 (a stable sort
    of the flat scores: ties by flat position); N:M keeps the n highest of each m columns at every
    m-th column (a stable descending sort: ties keep the lower column). Then column by column
    err = (w - q) / U[i, i], W1[:, i:] -= err U[i, i:]; after the block W[:, end:] -= Err U.
    """
    w = kernel.t().contiguous().float()
    h = hessian.float().clone()
    rows, columns = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += dampening * torch.mean(torch.diag(h)) * torch.eye(columns)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    diagonal = torch.diag(u)
    pruned = torch.zeros_like(w)
    kept = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        width = end - start
        w1 = w[:, start:end].clone()
        q1 = torch.zeros_like(w1)
        errors = torch.zeros_like(w1)
        u1 = u[start:end, start:end]
        d1 = diagonal[start:end]
        keep = torch.ones_like(w1, dtype=torch.bool)
        if sparsity is not None:
            count = round(sparsity * rows * width)
            if count:
                scores = (w1 ** 2 / d1[None, :] ** 2).flatten()
                order = torch.sort(scores, stable=True).indices
                flat = torch.ones_like(scores, dtype=torch.bool)
                flat[order[:count]] = False
                keep = flat.reshape(w1.shape)
        for i in range(width):
            if n is not None and i % m == 0:
                scores = w1[:, i:i + m] ** 2 / d1[None, i:i + m] ** 2
                top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]
                keep[:, i:i + m] = False
                keep[:, i:i + m].scatter_(1, top, True)
            column = w1[:, i]
            q = torch.where(keep[:, i], column, torch.zeros_like(column))
            err = (column - q) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
            q1[:, i] = q
            errors[:, i] = err
        pruned[:, start:end] = q1
        kept[:, start:end] = keep
        w[:, end:] -= errors @ u[start:end, end:]
    return pruned.t(), kept.t()


def seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of one call (its results ready), and the results."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def main() -> None:
    """Times both implementations per setting, in alternating rounds, and prints the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each")
    parser.add_argument("--layers", type=int, default=None,
                        help="prune only the first N target kernels (a quick run)")
    args = parser.parse_args()
    before = machine.describe()
    print(f"torch threads: {torch.get_num_threads()}; jax devices: {jax.device_count()} "
          f"{jax.default_backend()}")

    model, tokenizer = models.load("smollm2")
    batches = tasks.calibration_batches(tokenizer, "", 256, 8, 4)
    grams = models.activation_grams(model, batches)
    params = nnx.state(model, nnx.Param)
    weights = dict(zip(pruning.leaf_paths(params), jax.tree.leaves(params), strict=True))
    paths = sorted(grams)[:args.layers]
    kernels = {p: np.array(weights[p], np.float32) for p in paths}
    hessians = {p: np.array(grams[p], np.float32) for p in paths}
    device = {p: (jax.device_put(kernels[p]), jax.device_put(hessians[p])) for p in paths}
    host = {p: (torch.from_numpy(kernels[p]), torch.from_numpy(hessians[p])) for p in paths}
    shapes = sorted({k.shape for k in kernels.values()})
    print(f"{len(paths)} kernels of shapes {shapes}; Hessians over "
          f"{sum(int(b['input_ids'].size) for b in batches):,} tokens")

    print("| setting | es_jax s | torch s | torch / es_jax | es_jax first call (compiles) "
          "| max abs kernel diff | mask entries differing | summed error, es_jax / torch |")
    print("|---|---|---|---|---|---|---|---|")
    for name, setting in SETTINGS.items():
        def run_jax(setting: dict[str, Any] = setting) -> list[pruning.Reconstruction]:
            return [pruning.sparsegpt(k, h, **setting, block_size=BLOCK_SIZE,
                                      dampening=DAMPENING) for k, h in device.values()]

        def run_torch(setting: dict[str, Any] = setting) -> list[tuple[torch.Tensor, ...]]:
            return [torch_sparsegpt(k, h, **setting) for k, h in host.values()]

        first, jax_out = seconds(run_jax)
        _, torch_out = seconds(run_torch)
        times: dict[str, list[float]] = {"jax": [], "torch": []}
        for _ in range(args.repeats):
            times["jax"].append(seconds(run_jax)[0])
            times["torch"].append(seconds(run_torch)[0])
        jax_s, torch_s = statistics.median(times["jax"]), statistics.median(times["torch"])
        diff = max(float(np.max(np.abs(np.asarray(r.kernel) - t[0].numpy())))
                   for r, t in zip(jax_out, torch_out, strict=True))
        masks = sum(int(np.sum(np.asarray(r.mask) != t[1].numpy()))
                    for r, t in zip(jax_out, torch_out, strict=True))
        jax_error = sum(float(r.error) for r in jax_out)
        torch_error = sum(float(pruning.reconstruction_error(kernels[p], t[0].numpy(), hessians[p]))
                          for p, t in zip(paths, torch_out, strict=True))
        print(f"| {name} | {jax_s:.2f} | {torch_s:.2f} | {torch_s / jax_s:.2f}x | "
              f"{first:.2f} s ({first - jax_s:.2f} s over a timed call) | {diff:.2e} | "
              f"{masks:,} of {sum(k.size for k in kernels.values()):,} | "
              f"{jax_error:.6g} / {torch_error:.6g} |")
    print(f"medians of {args.repeats} alternating rounds; goal: torch / es_jax >= 1.5x")
    machine.report(before)


if __name__ == "__main__":
    main()
