"""What a benchmark ran on: CPU model, cores, thread settings, versions and load, printed with its
ratios (import it from a script in benchmarks/, which puts this folder on the path)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

BUSY = 0.5  # a 1-minute load above this fraction of the cores makes ratios unreliable


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def versions() -> str:
    """Versions of the frameworks a benchmark compares."""
    found = []
    for name in ("jax", "jaxlib", "flax", "torch", "numpy"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def load() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


def describe() -> tuple[float, float, float]:
    """Prints the machine and its load before the benchmark; warns when it is busy. Returns the
    load, for `report`."""
    cores = os.cpu_count() or 1
    threads = {name: os.environ.get(name, "-")
               for name in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    before = load()
    print(f"machine: {cpu_model()}, {cores} cores, Python {platform.python_version()}, "
          f"{versions()}")
    print("threads: " + ", ".join(f"{k}={v}" for k, v in threads.items()))
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
