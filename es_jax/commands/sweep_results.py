"""The sweep's results: results.json rewritten atomically after every level, the CSV and tables.

`ResultsStore` holds one record per run (model/task/pattern/scorer, keyed by `run_id`) with its
dense value and levels, keeps every run it holds (whatever config wrote it), and saves it as
strict JSON through `write_atomically` so a crash never leaves a half-written file; the values of
a fine-tuned level's seeds wait in its `pending` section until every seed is done, so a crash
loses at most one seed's fine-tuning. `exclusive` lets one sweep at a time write a workdir;
`finalise` adds drops, essential sparsity (the paper's rule on the seed means, and the
noise-aware rule against the seed spread) and knee to a record; `write_csv`, `summary_table` and
`levels_table` turn the finished runs into results.csv and the Markdown of summary.md.
`SCHEMA_VERSION` is the version of the results.json layout.
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
from es_jax.commands.sweep_config import checkpoint_source, image_normalisation
from es_jax.evaluate.tasks import UNIT_RANGE

SCHEMA_VERSION = 1
# Model settings added after results were first stored, with their defaults (see fingerprint).
NEW_SETTINGS = {"seeds": (), "labels_per_class": 100, "dtype": "float32"}
RESULTS_FILE = "results.json"
LOCK_FILE = ".sweep.lock"


# ----------------------------------------------------------------------------------------------
# Results: a JSON file rewritten atomically after every level.


def fingerprint(key: str, settings: ml_collections.ConfigDict, config: Any) -> str:
    """A hash of everything that changes a level's value (not tasks/scorers/patterns lists).

    Settings added later are hashed only where they differ from their default, so that a
    stored run of a config that does not use them keeps its fingerprint: the fine-tune `seeds`
    (when given), `labels_per_class` (when not 100), the parameter `dtype` (when not float32:
    another dtype gives other values), and the pixel normalisation (mean, std)
    of a vision model that does not take [-1, 1] pixels (`sweep_config.image_normalisation`).
    A pre-training checkpoint's resolved "RUN_DIR@STEP" is hashed too, so a run that saved a
    newer step since is computed again.
    """
    relevant = settings.to_dict()
    for name in ("tasks", "scorers", "patterns"):
        relevant.pop(name)
    for name, default in NEW_SETTINGS.items():
        if name in relevant and _as_json(relevant[name]) == _as_json(default):
            relevant.pop(name)
    normalisation = image_normalisation(settings)
    if normalisation != UNIT_RANGE:
        relevant["normalisation"] = [list(normalisation.mean), list(normalisation.std)]
    source = checkpoint_source(settings)
    if source is not None:
        relevant["checkpoint"] = source
    relevant.update(key=key, seed=config.seed, data_dir=config.data_dir)
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _as_json(value: Any) -> str:
    """A value as JSON text (tuples and lists alike), for comparing settings."""
    return json.dumps(value, sort_keys=True, default=str)


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
        # Per-seed values of levels not finished yet: {key: {"fingerprint", "values": {seed: v}}}
        self.pending: dict[str, dict] = dict(previous.get("pending", {}))

    def pending_values(self, key: str, stamp: str) -> dict[int, float]:
        """The seeds' values stored for an unfinished level ({} if none, or of another
        fingerprint)."""
        entry = self.pending.get(key)
        if entry is None or entry.get("fingerprint") != stamp:
            return {}
        return {int(seed): value for seed, value in entry["values"].items()}

    def add_pending(self, key: str, stamp: str, seed: int, value: float) -> None:
        """Stores one seed's value of an unfinished level (dropping values of another
        fingerprint); call `save` to write it."""
        values = {str(s): v for s, v in self.pending_values(key, stamp).items()}
        self.pending[key] = {"fingerprint": stamp, "values": {**values, str(seed): value}}

    def clear_pending(self, key: str) -> None:
        """Forgets an unfinished level's seed values (it is finished, its record holds them)."""
        self.pending.pop(key, None)

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
            "pending": self.pending,
        }
        try:
            text = json.dumps(document, indent=1, default=_json_default, allow_nan=False)
        except ValueError as error:
            message = f"{self.path}: refusing to write a non-finite number ({error})."
            raise ValueError(message) from None
        if is_writer():
            write_atomically(self.path, text + "\n")


def is_writer() -> bool:
    """Whether this process writes the workdir's files: host 0 of a multi-host run (every host
    computes the same values; one writes them)."""
    import jax

    return jax.process_index() == 0


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
    holder ends, however it ends (SIGKILL included): a lock file left behind never blocks. Host 0
    alone takes it: the other hosts of a multi-host run share its workdir and write nothing.
    """
    import jax

    if jax.process_index() != 0:
        yield
        return
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
    """Adds drops, essential sparsity, knee and epsilon to a run record (in place).

    A run fine-tuned over seeds (it holds `dense_std`) also gets, per level, its `noise`
    (sqrt(dense_std^2 + std^2)) and whether its drop is `beyond_noise` (beyond both epsilon and
    that spread), and the run its `essential_sparsity_noise_aware`; `essential_sparsity` is
    always the paper's rule on the (mean) values.
    """
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
    if "dense_std" in record:
        for level in record["levels"]:
            level["noise"] = essential.seed_noise(record["dense_std"], level.get("std", 0.0))
            level["beyond_noise"] = essential.beyond_noise(level["drop"], tolerance, level["noise"])
        noises = [level["noise"] for level in record["levels"]]
        record["essential_sparsity_noise_aware"] = essential.noise_aware_essential_sparsity(
            sparsities, drops, tolerance, noises
        )
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
    # Fine-tuned over seeds: value is the seed mean; std its sample standard deviation; noise
    # and beyond_noise as in `finalise`; the noise-aware essential sparsity of the run.
    "seeds",
    "values",
    "std",
    "dense_std",
    "noise",
    "beyond_noise",
    "essential_sparsity_noise_aware",
)


def write_csv(runs: Sequence[dict], path: Path) -> None:
    """One row per (run, level); per-seed `seeds` and `values` joined by spaces."""
    rows = []
    for run in runs:
        for level in run["levels"]:
            row = {**{k: run[k] for k in CSV_FIELDS if k in run}, **level}
            for name in ("seeds", "values"):
                if name in row:
                    row[name] = " ".join(str(v) for v in row[name])
            rows.append(row)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def summary_table(runs: Sequence[dict]) -> str:
    """A Markdown table: dense value (mean +- std over the seeds of a fine-tuned run), essential
    sparsity by the paper's rule on the means, by the noise-aware rule ("-" for a run without
    seeds), and knee of every run."""
    lines = [
        "| model | task | metric | pattern | scorer | seeds | dense | essential sparsity "
        "(paper: mean drop <= epsilon) | essential sparsity (noise-aware: drop > epsilon and > "
        "seed spread) | knee |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        knee = "-" if run.get("knee") is None else f"{100 * run['knee']:.0f}%"
        dense = f"{run['dense']:.2f}"
        if "dense_std" in run:
            dense += f" ± {run['dense_std']:.2f}"
        aware = run.get("essential_sparsity_noise_aware")
        aware = "-" if aware is None else f"{100 * aware:.0f}%"
        seeds = len(run.get("seeds", ())) or "-"
        lines.append(
            f"| {run['model']} | {run['task']} | {run['metric']} | {run['pattern']} | "
            f"{run['scorer']} | {seeds} | {dense} | {100 * run['essential_sparsity']:.0f}% | "
            f"{aware} | {knee} |"
        )
    return "\n".join(lines)


def levels_table(runs: Sequence[dict]) -> str:
    """A Markdown table of every level's value per run (columns: sparsities); a fine-tuned run
    over seeds shows mean +- std."""
    sparsities = sorted({level["sparsity"] for run in runs for level in run["levels"]})
    header = "| run | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |"
    lines = [header, "|---|" + "---|" * len(sparsities)]
    for run in runs:
        values = {level["sparsity"]: level_cell(level) for level in run["levels"]}
        cells = [values.get(s, "") for s in sparsities]
        name = f"{run['model']}/{run['task']}/{run['pattern']}/{run['scorer']}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def level_cell(level: dict) -> str:
    """A level's value for a table: "71.20", or "71.20 ± 0.85" when it has a seed spread."""
    text = f"{level['value']:.2f}"
    return text + f" ± {level['std']:.2f}" if "std" in level else text
