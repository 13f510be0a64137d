"""What a benchmark ran on: CPU model, cores, thread settings, versions and load, printed with its
ratios; and the median-of-calls timer the benchmarks share (import it from a script in
benchmarks/, which puts this folder on the path)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata

BUSY = 0.5  # a 1-minute load above this fraction of the cores makes ratios unreliable


def cpu_model() -> str:
    """The CPU's model name, family and model numbers and widest vector ISA from /proc/cpuinfo
    (e.g. "AMD EPYC (family 26, model 2; AVX-512)"; the platform's processor string elsewhere).
    Model names of cloud CPUs are often bare ("AMD EPYC"), and the vector ISA decides much of
    XLA's and PyTorch's speed."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    isa = next(
        (name for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
         if flag in flags),
        "no AVX2",
    )
    return (f"{fields['model name']} (family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')}; {isa})")


def versions() -> str:
    """Versions of the frameworks a benchmark compares."""
    found = []
    for name in ("jax", "jaxlib", "flax", "torch", "numpy"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of `run()` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; all of them where that is unknown).
    A container may see more cores than it may use, and XLA sizes its thread pool by the former."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def torch_threads() -> str:
    """PyTorch's intra- and inter-op thread counts, or "-" where torch is not installed."""
    try:
        import torch
    except ImportError:
        return "-"
    return f"{torch.get_num_threads()} (inter-op {torch.get_num_interop_threads()})"


def describe() -> tuple[float, float, float]:
    """Prints the machine, both frameworks' thread settings and the load before the benchmark;
    warns when it is busy. Returns the load, for `report`."""
    cores = usable_cores()
    threads = {name: os.environ.get(name, "-")
               for name in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    before = load()
    print(f"machine: {cpu_model()}, {cores} usable cores of {os.cpu_count()}, Python "
          f"{platform.python_version()}, {versions()}")
    print("threads: " + ", ".join(f"{k}={v}" for k, v in threads.items())
          + f", torch threads={torch_threads()}")
    print(f"load before: {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}")
    if before[0] > BUSY * cores:
        print(f"WARNING: the 1-minute load {before[0]:.2f} is above {BUSY} x {cores} cores; "
              "other work shares the CPU and the ratios below may not hold on a quiet machine.")
    return before


def report(before: tuple[float, float, float]) -> None:
    """Prints the load after the benchmark beside the load before it."""
    after = load()
    print(f"load before -> after: {before[0]:.2f} -> {after[0]:.2f} (1 min), "
          f"{before[1]:.2f} -> {after[1]:.2f} (5 min)")
