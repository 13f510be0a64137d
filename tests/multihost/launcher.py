"""Starts, waits for and kills a group of JAX processes on this machine that run one `es-jax`
command together: each host a process with its own CPU devices, joined by `jax.distributed` on
127.0.0.1 (`host.py`), all of them in one process group that a failure or a test kills whole.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

HOST = Path(__file__).with_name("host.py")
REPOSITORY = Path(__file__).parents[2]
TAIL = 3000  # characters of each host's output shown when the group fails


class Hosts(NamedTuple):
    """A started group: its processes (host 0 leads the process group) and their output files."""

    processes: list[subprocess.Popen]
    logs: list[Path]


def free_address() -> str:
    """127.0.0.1 and a port nothing listens on now, for the coordinator."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


class Layout(NamedTuple):
    """How a run is laid out: `processes` hosts of `devices` CPU devices each; `logs` gets host
    i's output as host_i.log; `compilations` is the JAX compilation cache the runs of a test
    share (on 2 cores compiling is most of a tiny run's time)."""

    processes: int
    devices: int
    logs: Path
    compilations: Path


def start(command: Sequence[str], layout: Layout) -> Hosts:
    """Starts the hosts of `es-jax COMMAND` in a new process group (their output appended to
    the layout's logs)."""
    environment = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={layout.devices}",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(layout.compilations),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    processes, logs = layout.processes, layout.logs
    address = free_address()
    logs.mkdir(parents=True, exist_ok=True)
    started: list[subprocess.Popen] = []
    paths = [logs / f"host_{i}.log" for i in range(processes)]
    for index, path in enumerate(paths):
        with open(path, "a") as log:
            started.append(subprocess.Popen(
                [sys.executable, str(HOST), address, str(processes), str(index), *command],
                cwd=REPOSITORY, env=environment, stdout=log, stderr=subprocess.STDOUT,
                process_group=started[0].pid if started else 0,
            ))
    return Hosts(started, paths)


def kill(hosts: Hosts) -> None:
    """SIGKILLs the whole process group and reaps every host."""
    with contextlib.suppress(ProcessLookupError):  # every host has already ended
        os.killpg(hosts.processes[0].pid, signal.SIGKILL)
    for process in hosts.processes:
        process.wait()


def failure(hosts: Hosts, why: str) -> str:
    """`why`, with each host's exit code and the tail of its output."""
    parts = [why]
    for index, (process, log) in enumerate(zip(hosts.processes, hosts.logs, strict=True)):
        parts.append(f"--- host {index} (exit code {process.poll()}), {log}:\n"
                     f"{log.read_text(errors='replace')[-TAIL:]}")
    return "\n".join(parts)


def wait_until(condition: Callable[[], bool], hosts: Hosts, timeout: float) -> None:
    """Polls until `condition()` holds; kills the group and fails the test, showing each host's
    output, if a host fails first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        codes = [process.poll() for process in hosts.processes]
        if any(code not in (None, 0) for code in codes):
            kill(hosts)
            pytest.fail(failure(hosts, f"a host failed (exit codes {codes})"))
        if time.monotonic() > deadline:
            kill(hosts)
            pytest.fail(failure(hosts, f"not done in {timeout:.0f} s (exit codes {codes})"))
        time.sleep(0.01)


def finish(hosts: Hosts, timeout: float) -> None:
    """Waits for every host to end with exit code 0 (`wait_until`'s failures otherwise)."""
    wait_until(lambda: all(process.poll() == 0 for process in hosts.processes), hosts, timeout)


def run(command: Sequence[str], layout: Layout, timeout: float) -> None:
    """Runs `es-jax COMMAND` on the layout's hosts to its end."""
    finish(start(command, layout), timeout)
