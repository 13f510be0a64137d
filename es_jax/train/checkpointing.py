"""Orbax checkpoints of a training run: save schedule, exact resume, corrupt-step skipping.

A step's checkpoint holds the train state pytree (parameters, optimizer state, step, RNG key data)
and the grain iterator state of every host, so a run restored from it continues exactly as if it had
never stopped. A checkpoint that cannot be read is moved aside with a warning naming it, and the run
resumes from the one before it. The run's config is stored beside the checkpoints, and a different
config pointed at the same directory is refused unless forced.

Readers of finished runs (analyses across checkpoints) find the runs under a folder (`find_runs`)
and open each (`open_run`): its saved steps, its stored config, and its parameters at any step as
host numpy arrays, whatever devices or sharding they were saved with.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
CONFIG_FILE = "config.json"


class IteratorStateSnapshot:
    """A grain iterator's state frozen at save time, in the shape grain's Orbax handler expects."""

    def __init__(self, state: dict[str, Any] | None = None):
        self.state = state

    def get_state(self) -> bytes:
        """The frozen state as JSON bytes."""
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        """Receives the state read back from a checkpoint."""
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        """Nothing to prefetch: this object only carries the state."""


def checkpoint_steps(total_steps: int, every: int, log_spaced: int = 0) -> list[int]:
    """Steps to save: 0, every multiple of `every`, `total_steps`, and `log_spaced` early steps."""
    if every <= 0 or total_steps <= 0:
        raise ValueError(
            f"checkpoint_every ({every}) and total_steps ({total_steps}) must both be positive."
        )
    steps = {0, total_steps, *range(every, total_steps + 1, every)}
    if log_spaced > 0:
        early = np.geomspace(1, min(every, total_steps), num=log_spaced)
        steps |= {round(float(s)) for s in early}
    return sorted(steps)


def open_manager(directory: str | Path, async_save: bool = True) -> ocp.CheckpointManager:
    """A manager that keeps every checkpoint and saves in the background."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain_checkpoint.CheckpointHandler(),
        },
    )


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict[str, Any] | None
) -> None:
    """Starts saving the train state and this host's data-iterator state at `step`."""
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain_checkpoint.CheckpointSave(IteratorStateSnapshot(data_state)),
        ),
        force=True,
    )


def _restore_step(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> tuple[Any, dict[str, Any]]:
    """Reads one step's train state and data-iterator state."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain_checkpoint.CheckpointRestore(IteratorStateSnapshot()),
        ),
    )
    return restored["state"], restored["data"].state


def quarantine(manager: ocp.CheckpointManager, step: int, reason: str) -> Path:
    """Moves an unreadable step out of the checkpoint directory, warning with its name."""
    source = Path(manager.directory) / str(step)
    target_dir = Path(manager.directory).parent / CORRUPT_DIR
    target = target_dir / str(step)
    if jax.process_index() == 0:
        target_dir.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(source), str(target))
    warnings.warn(
        f"Checkpoint {source} could not be read ({reason}); moved it to {target} and resuming "
        "from the checkpoint before it.",
        stacklevel=2,
    )
    return target


def _layout(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(key path, shape) of every leaf of a train state or of its checkpoint metadata."""
    def name(key: Any) -> str:
        for attribute in ("key", "idx", "name"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [("/".join(map(name, path)), tuple(leaf.shape)) for path, leaf in leaves]


def saved_layout(manager: ocp.CheckpointManager, step: int) -> list | None:
    """The layout recorded in a checkpoint's metadata, or None where that cannot be read."""
    try:
        metadata = manager.item_metadata(step)["state"]
        return _layout(metadata.tree if hasattr(metadata, "tree") else metadata)
    except Exception:  # unreadable metadata: the checkpoint is corrupt, not of another model
        return None


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any
) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest readable checkpoint as (step, state, data state), or None if there is none."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state, data_state = _restore_step(manager, step, abstract_state)
        except Exception as error:  # any unreadable step is skipped, never fatal...
            layout = saved_layout(manager, step)
            if layout is not None and layout != _layout(abstract_state):
                # ...unless it is readable but of another model: that is a config error.
                raise ValueError(
                    f"Checkpoint {Path(manager.directory) / str(step)} holds a train state of "
                    "another shape or structure than this config builds; it was written with "
                    "another config. Use another --workdir for this config."
                ) from error
            quarantine(manager, step, f"{type(error).__name__}: {str(error)[:200]}")
            manager.reload()
            continue
        return step, state, data_state
    return None


def open_reader(directory: str | Path) -> ocp.CheckpointManager:
    """A read-only manager over the checkpoints in `directory`, for reading them as pytrees.

    The data item is named with its handler although readers never restore it: Orbax otherwise
    warns about it once per checkpoint.
    """
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data": grain_checkpoint.CheckpointHandler()},
    )


def read_state(directory: str | Path, step: int) -> Any:
    """One step's train state as numpy arrays, whatever devices or sharding it was saved with."""
    manager = open_reader(directory)
    tree = _state_metadata(manager, step)
    restore_args = _numpy_restore_args(tree)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args)),
    )
    manager.close()
    return restored["state"]


def read_params(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """One checkpoint's parameters (only), as host numpy arrays."""
    params_tree = {"params": _state_metadata(manager, step)["params"]}
    restore_args = {"params": _numpy_restore_args(params_tree["params"])}
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=params_tree, restore_args=restore_args, partial_restore=True
            )
        ),
    )
    return restored["state"]["params"]


def _state_metadata(manager: ocp.CheckpointManager, step: int) -> Any:
    """The tree of array metadata of one step's train state."""
    metadata = manager.item_metadata(step)["state"]
    return metadata.tree if hasattr(metadata, "tree") else metadata


def _numpy_restore_args(tree: Any) -> Any:
    """Restore arguments that read every array of `tree` into host memory."""
    return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)


class RunReader(NamedTuple):
    """A finished (or running) run opened for reading: where it is, what it saved, its config."""

    directory: Path
    steps: list[int]
    config: dict[str, Any]
    read_params: Callable[[int], dict[str, Any]]


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a training run keeps its checkpoints."""
    return Path(run_dir) / CHECKPOINT_DIR


def find_runs(workdir: str | Path) -> list[Path]:
    """The run directories under `workdir`: itself if it holds checkpoints, else its children."""
    workdir = Path(workdir)
    if checkpoint_dir(workdir).is_dir():
        return [workdir]
    children = sorted(workdir.iterdir(), key=lambda p: _natural(p.name)) if workdir.is_dir() else []
    runs = [p for p in children if checkpoint_dir(p).is_dir()]
    if not runs:
        raise ValueError(
            f"{workdir} holds no checkpoints/ directory, nor do its sub-directories; point "
            "--workdir at a pre-training run (or at a folder of runs)."
        )
    return runs


def open_run(run_dir: str | Path) -> RunReader:
    """A run's saved steps (ascending), its stored config ({} if none), a reader of its params."""
    run_dir = Path(run_dir)
    manager = open_reader(checkpoint_dir(run_dir))
    steps = sorted(manager.all_steps())
    if not steps:
        raise ValueError(f"{checkpoint_dir(run_dir)} holds no complete checkpoint yet.")
    config_file = run_dir / CONFIG_FILE
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    return RunReader(run_dir, steps, config, partial(read_params, manager))


def _natural(key: str) -> tuple:
    """Sort key that puts "10" after "9"."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key))


def config_fingerprint(config: Any) -> dict[str, Any]:
    """The config as plain JSON-able data, for storing and comparing."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(as_dict, sort_keys=True, default=str))


def config_differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list:
    """Dotted keys whose values differ between two config dicts."""
    differences = []
    for key in sorted(set(stored) | set(current)):
        name = f"{prefix}{key}"
        old, new = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, dict) and isinstance(new, dict):
            differences += config_differences(old, new, prefix=f"{name}.")
        elif old != new:
            differences.append(f"{name}: {old!r} -> {new!r}")
    return differences


def check_config(
    workdir: str | Path, config: Any, force: bool, ignore: Iterable[str] = ("force",)
) -> None:
    """Stores the config in a new workdir; refuses a different one in an existing workdir."""
    path = Path(workdir) / CONFIG_FILE
    current = {k: v for k, v in config_fingerprint(config).items() if k not in set(ignore)}
    if path.exists():
        stored = {k: v for k, v in json.loads(path.read_text()).items() if k not in set(ignore)}
        differences = config_differences(stored, current)
        if differences and not force:
            raise ValueError(
                f"Workdir {workdir} holds a run with a different config ({path}):\n  "
                + "\n  ".join(differences)
                + "\nUse another --workdir, or pass --config.force=True to continue this run "
                "with the new config."
            )
        if not differences:
            return
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial_path = path.with_suffix(".partial")
        partial_path.write_text(json.dumps(current, indent=2, sort_keys=True))
        partial_path.rename(path)  # atomic: a kill never leaves a half-written config
