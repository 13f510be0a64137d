"""The sweep's results: results.json rewritten atomically after every level, the CSV and tables.

`ResultsStore` holds one record per run (model/task/pattern/scorer, keyed by `run_id`) with its
dense value and levels, keeps every run it holds (whatever config wrote it), and saves it as
strict JSON through `write_atomically` so a crash never leaves a half-written file; `exclusive`
lets one sweep at a time write a workdir; `finalise` adds drops,
essential sparsity and knee to a record; `write_csv`, `summary_table` and `levels_table` turn the
finished runs into results.csv and the Markdown of summary.md. `SCHEMA_VERSION` is the version of
the results.json layout.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from es_jax.analysis import essential
from es_jax.commands.command_line import first_line

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
LOCK_FILE = ".sweep.lock"


# ----------------------------------------------------------------------------------------------
# Results: a JSON file rewritten atomically after every level.


def fingerprint(key: str, settings: ml_collections.ConfigDict, config: Any) -> str:
    """A hash of everything that changes a level's value (not tasks/scorers/patterns lists)."""
    relevant = settings.to_dict()
    for name in ("tasks", "scorers", "patterns"):
        relevant.pop(name)
    relevant.update(key=key, seed=config.seed, data_dir=config.data_dir)
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_id(model: str, task: str, pattern: str, scorer: str) -> str:
    """The identity of one curve: model/task/pattern/scorer."""
    return f"{model}|{task}|{pattern}|{scorer}"


def write_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


class ResultsStore:
    """The sweep's results.json: runs keyed by run_id, saved after every change.

    It keeps every run it holds, whatever config wrote it: a sweep adds and completes the runs
    of its own config and leaves the others as they are. A run is reset only when its config
    computes it with other settings (another fingerprint) and the sweep is told to overwrite.
    """

    def __init__(self, workdir: Path, config: ml_collections.ConfigDict):
        self.path = workdir / RESULTS_FILE
        self.config = config
        previous = read_results(self.path)
        self.runs: dict[str, dict] = {r["id"]: r for r in previous.get("runs", [])}
        self.compilations: dict[str, int] = dict(previous.get("compilations", {}))

    def run(self, model: str, task: Any, pattern: str, scorer: str, stamp: str) -> dict:
        """The run record, created (or reset when its fingerprint changed) on first use."""
        rid = run_id(model, task.name, pattern, scorer)
        record = self.runs.get(rid)
        if record is None or record.get("fingerprint") != stamp:
            record = {
                "id": rid,
                "model": model,
                "task": task.name,
                "metric": task.metric,
                "higher_is_better": task.higher_is_better,
                "pattern": pattern,
                "scorer": scorer,
                "protocol": task.protocol,
                "dense": None,
                "levels": [],
                "fingerprint": stamp,
            }
            self.runs[rid] = record
        return record

    def save(self) -> None:
        """Rewrites results.json atomically, as strict JSON (a non-finite number is an error)."""
        document = {
            "schema_version": SCHEMA_VERSION,
            "config": self.config.to_dict(),
            "compilations": self.compilations,
            "runs": list(self.runs.values()),
        }
        try:
            text = json.dumps(document, indent=1, default=_json_default, allow_nan=False)
        except ValueError as error:
            message = f"{self.path}: refusing to write a non-finite number ({error})."
            raise ValueError(message) from None
        write_atomically(self.path, text + "\n")


def read_results(path: Path) -> dict:
    """What a results.json holds ({} when there is none); ValueError naming the file when it is
    not a sweep's results."""
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path} cannot be read as a sweep's results ({first_line(error)}); move it away or "
            "use another --workdir."
        ) from None
    runs = document.get("runs") if isinstance(document, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and "id" in r for r in runs):
        raise ValueError(
            f"{path} is not a sweep's results (no list of runs with ids); move it away or use "
            "another --workdir."
        )
    return document


def _refuse_constant(name: str) -> float:
    """Refuses NaN and Infinity in results.json (strict JSON)."""
    raise ValueError(f"a non-finite number ({name})")


@contextlib.contextmanager
def exclusive(workdir: Path, command: str = "sweep") -> Iterator[None]:
    """Holds the workdir's lock for one run of `command`; ValueError if another process holds it.

    The lock is an `flock` on `WORKDIR/.sweep.lock`, which the operating system releases when its
    holder ends, however it ends (SIGKILL included): a lock file left behind never blocks.
    """
    path = workdir / LOCK_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ValueError(
                f"{workdir} is in use by {holder}; wait for it to finish, or use another "
                "--workdir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"es-jax {command}, pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _json_default(value: Any) -> Any:
    """JSON for numpy scalars and tuples inside the config."""
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def level_of(record: dict, sparsity: float) -> dict | None:
    """The record's level at this sparsity, if already done."""
    for level in record["levels"]:
        if abs(level["sparsity"] - sparsity) < 1e-9:
            return level
    return None


def finalise(record: dict, epsilon_config: Any) -> dict:
    """Adds drops, essential sparsity, knee and epsilon to a run record (in place)."""
    eps = essential.default_epsilon(
        record["metric"], epsilon_config.absolute, epsilon_config.relative
    )
    tolerance = eps.tolerance(record["dense"])
    record["levels"].sort(key=lambda level: level["sparsity"])
    for level in record["levels"]:
        level["drop"] = essential.drop(level["value"], record["dense"], record["higher_is_better"])
    sparsities = [level["sparsity"] for level in record["levels"]]
    drops = [level["drop"] for level in record["levels"]]
    record["epsilon"] = eps.as_dict()
    record["tolerance"] = tolerance
    record["essential_sparsity"] = essential.essential_sparsity(sparsities, drops, tolerance)
    record["knee"] = essential.knee(sparsities, drops, tolerance)
    return record


CSV_FIELDS = (
    "model",
    "task",
    "pattern",
    "scorer",
    "metric",
    "sparsity",
    "measured_sparsity",
    "model_sparsity",
    "value",
    "prune_seconds",
    "dense",
    "drop",
    "essential_sparsity",
)


def write_csv(runs: Sequence[dict], path: Path) -> None:
    """One row per (run, level)."""
    rows = []
    for run in runs:
        for level in run["levels"]:
            rows.append({**{k: run[k] for k in CSV_FIELDS if k in run}, **level})
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def summary_table(runs: Sequence[dict]) -> str:
    """A Markdown table: dense value, essential sparsity and knee of every run."""
    lines = [
        "| model | task | metric | pattern | scorer | dense | essential sparsity | knee |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        knee = "-" if run.get("knee") is None else f"{100 * run['knee']:.0f}%"
        lines.append(
            f"| {run['model']} | {run['task']} | {run['metric']} | {run['pattern']} | "
            f"{run['scorer']} | {run['dense']:.2f} | {100 * run['essential_sparsity']:.0f}% | "
            f"{knee} |"
        )
    return "\n".join(lines)


def levels_table(runs: Sequence[dict]) -> str:
    """A Markdown table of every level's value per run (columns: sparsities)."""
    sparsities = sorted({level["sparsity"] for run in runs for level in run["levels"]})
    header = "| run | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |"
    lines = [header, "|---|" + "---|" * len(sparsities)]
    for run in runs:
        values = {level["sparsity"]: level["value"] for level in run["levels"]}
        cells = [f"{values[s]:.2f}" if s in values else "" for s in sparsities]
        name = f"{run['model']}/{run['task']}/{run['pattern']}/{run['scorer']}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
