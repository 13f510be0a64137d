"""Orbax checkpoints of a training run: save schedule, exact resume, corrupt-step skipping.

A step's checkpoint holds the train state pytree (parameters, optimizer state, step, RNG key data),
the grain iterator state of every host, and a 64-bit checksum of every array of the train state, so
a run restored from it continues exactly as if it had never stopped. A checkpoint that cannot be
read back as saved (files missing or cut short, or arrays whose bits no longer match their
checksums) raises `UnreadableCheckpoint`: resuming moves it aside with a warning naming it and
takes the one before it; readers of finished runs skip it. Checkpoints saved before checksums
existed are read unchecked. The run's config is stored beside the checkpoints, and a different
config pointed at the same directory is refused unless forced.

Checksums are computed by the devices that hold the arrays (`state_checksums`: one jitted pass,
summed across devices and hosts by XLA), so on many hosts every array is covered whatever its
sharding, every host gets the same answer, and host 0 writes them (a small JSON item of the same
Orbax checkpoint, committed with it). The data-iterator state is not checksummed: it is JSON, and a
damaged one fails to parse.

Readers of finished runs (analyses across checkpoints) find the runs under a folder (`find_runs`)
and open each (`open_run`): its saved steps, its stored config, and its parameters at any step as
host numpy arrays, whatever devices or sharding they were saved with.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
CONFIG_FILE = "config.json"
CHECKSUM_ITEM = "checksums"
# Two 32-bit lanes, each seeded differently: a 64-bit digest per array.
_LANE_SEEDS = (0x243F6A88, 0x85A308D3)


class UnreadableCheckpoint(OSError):
    """A checkpoint that cannot be read back as saved: files missing, cut short, or altered."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"Checkpoint {path} could not be read ({reason})")
        self.path, self.reason = Path(path), reason


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
            CHECKSUM_ITEM: ocp.JsonCheckpointHandler(),
        },
    )


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict[str, Any] | None
) -> None:
    """Starts saving the train state, its checksums and this host's data-iterator state at `step`.

    The checksums are read back to the host before Orbax starts: the one wait this adds is for the
    state itself, which Orbax waits for anyway to copy it off the devices.
    """
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain_checkpoint.CheckpointSave(IteratorStateSnapshot(data_state)),
            **{CHECKSUM_ITEM: ocp.args.JsonSave(state_checksums(state))},
        ),
        force=True,
    )


def _restore_step(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> tuple[Any, dict[str, Any]]:
    """Reads one step's train state (checked against its checksums) and data-iterator state."""
    with _reading(manager, step):
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain_checkpoint.CheckpointRestore(IteratorStateSnapshot()),
            ),
        )
        verify_checksums(manager, step, restored["state"])
    return restored["state"], restored["data"].state


# ----------------------------------------------------------------------------- checksums


def state_checksums(tree: Any) -> dict[str, str]:
    """Each array's 64-bit digest (16 hex digits) by key path, computed where the arrays live."""
    paths, leaves = _paths(tree), jax.tree.leaves(tree)
    if not leaves:
        return {}
    digests = np.asarray(jax.device_get(_digests(leaves)))
    return {path: f"{high:08x}{low:08x}" for path, (high, low) in zip(paths, digests, strict=True)}


def verify_checksums(manager: ocp.CheckpointManager, step: int, tree: Any) -> None:
    """Refuses arrays read from a checkpoint whose bits differ from those it saved (a no-op for
    checkpoints saved without checksums); `tree` may be part of the state (its params alone)."""
    if not (checkpoint_path(manager, step) / CHECKSUM_ITEM).exists():
        return
    saved = manager.restore(step, args=ocp.args.Composite(
        **{CHECKSUM_ITEM: ocp.args.JsonRestore()}))[CHECKSUM_ITEM]
    read = state_checksums(tree)
    changed = [path for path, digest in read.items() if saved.get(path) != digest]
    if changed:
        raise UnreadableCheckpoint(
            checkpoint_path(manager, step),
            f"checksum mismatch: {', '.join(changed[:3])}"
            + (f" and {len(changed) - 3} more arrays" if len(changed) > 3 else "")
            + " differ from what was saved; its files were altered after saving",
        )


@jax.jit
def _digests(leaves: list[jax.Array]) -> jax.Array:
    """Per leaf, two 32-bit lanes: the wrapping sums of `first = mix(word ^ (position * golden +
    seed_1))` and of `mix(first ^ seed_2)` over its words.

    Every word and its position count, so a changed or moved word changes both sums (each by an
    independent-looking amount); a sum does not depend on the order it is taken in, so each
    device sums its shards and XLA adds them up.
    """
    rows = []
    for leaf in leaves:
        words = _words(leaf)
        salt = _positions(words.shape) * jnp.uint32(0x9E3779B9) + jnp.uint32(_LANE_SEEDS[0])
        first = _mix(words ^ salt)
        second = _mix(first ^ jnp.uint32(_LANE_SEEDS[1]))
        rows.append(jnp.stack([jnp.sum(first, dtype=jnp.uint32),
                               jnp.sum(second, dtype=jnp.uint32)]))
    return jnp.stack(rows)


def _words(leaf: jax.Array) -> jax.Array:
    """A leaf's bits as uint32 words (8-byte items as two words, 1- and 2-byte items widened)."""
    if leaf.dtype == jnp.bool_:
        return leaf.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[leaf.dtype.itemsize]
    return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major flat index (mod 2**32), built axis by axis to shard as the leaf."""
    positions, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        positions, stride = positions + iota * jnp.uint32(stride % 2**32), stride * shape[axis]
    return positions


def _mix(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection in which every output bit depends on every input
    bit."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


# ----------------------------------------------------------------------------- restoring


def checkpoint_path(manager: ocp.CheckpointManager, step: int) -> Path:
    """Where a step's checkpoint lives."""
    return Path(manager.directory) / str(step)


@contextlib.contextmanager
def _reading(manager: ocp.CheckpointManager, step: int) -> Iterator[None]:
    """Turns any failure to read checkpoint `step` into an UnreadableCheckpoint naming it."""
    try:
        yield
    except UnreadableCheckpoint:
        raise
    except Exception as error:  # Orbax and tensorstore raise many kinds: all mean unreadable
        reason = f"{type(error).__name__}: {str(error)[:200]}"
        raise UnreadableCheckpoint(checkpoint_path(manager, step), reason) from error


def quarantine(manager: ocp.CheckpointManager, step: int, reason: str) -> Path:
    """Moves an unreadable step out of the checkpoint directory, warning with its name."""
    source = checkpoint_path(manager, step)
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
    return list(zip(_paths(tree), [tuple(leaf.shape) for leaf in jax.tree.leaves(tree)],
                    strict=True))


def _paths(tree: Any) -> list[str]:
    """Every leaf's key path ("opt_state/1/0/mu/bert/..."), spelled alike for a train state and
    for the checkpoint metadata or numpy tree read back from it."""
    def name(key: Any) -> str:
        for attribute in ("key", "idx", "name"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    return ["/".join(map(name, path)) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def saved_layout(manager: ocp.CheckpointManager, step: int) -> list | None:
    """The layout recorded in a checkpoint's metadata, or None where that cannot be read."""
    try:
        metadata = manager.item_metadata(step)["state"]
        return _layout(metadata.tree if hasattr(metadata, "tree") else metadata)
    except Exception:  # unreadable metadata: the checkpoint is corrupt, not of another model
        return None


def check_layout(manager: ocp.CheckpointManager, abstract_state: Any) -> None:
    """Refuses checkpoints of another model: the newest one whose metadata can be read must hold
    a train state of the shapes and structure of `abstract_state` (reads only)."""
    for step in sorted(manager.all_steps(), reverse=True):
        layout = saved_layout(manager, step)
        if layout is not None:
            _refuse_other_layout(manager, step, layout, abstract_state)
            return


def _refuse_other_layout(
    manager: ocp.CheckpointManager, step: int, layout: list, abstract_state: Any
) -> None:
    """A ValueError naming the checkpoint if its layout is not that of `abstract_state`."""
    if layout != _layout(abstract_state):
        raise ValueError(
            f"Checkpoint {checkpoint_path(manager, step)} holds a train state of another shape "
            "or structure than this config builds; it was written with another config. Use "
            "another --workdir for this config."
        )


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any
) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest readable checkpoint as (step, state, data state), or None if there is none."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state, data_state = _restore_step(manager, step, abstract_state)
        except UnreadableCheckpoint as error:  # any unreadable step is skipped, never fatal...
            layout = saved_layout(manager, step)
            if layout is not None:
                # ...unless it is readable but of another model: that is a config error.
                _refuse_other_layout(manager, step, layout, abstract_state)
            quarantine(manager, step, error.reason)
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
                       "data": grain_checkpoint.CheckpointHandler(),
                       CHECKSUM_ITEM: ocp.JsonCheckpointHandler()},
    )


def read_state(directory: str | Path, step: int) -> Any:
    """One step's train state as numpy arrays, whatever devices or sharding it was saved with."""
    manager = open_reader(directory)
    with _reading(manager, step):
        tree = _state_metadata(manager, step)
        restore_args = _numpy_restore_args(tree)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args)))
        verify_checksums(manager, step, restored["state"])
    manager.close()
    return restored["state"]


def read_params(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """One checkpoint's parameters (only), as host numpy arrays checked against their checksums;
    UnreadableCheckpoint, naming it, if they cannot be read as saved."""
    with _reading(manager, step):
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
        verify_checksums(manager, step, restored["state"])
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
    """Refuses a config that differs from the one stored in the workdir, unless forced (reads
    only: `store_config` writes it once everything else has been checked)."""
    path = Path(workdir) / CONFIG_FILE
    differences = _stored_differences(path, config, ignore)
    if differences and not force:
        raise ValueError(
            f"Workdir {workdir} holds a run with a different config ({path}):\n  "
            + "\n  ".join(differences)
            + "\nUse another --workdir, or pass --config.force=True to continue this run "
            "with the new config."
        )


def store_config(workdir: str | Path, config: Any, ignore: Iterable[str] = ("force",)) -> None:
    """Stores the config as the workdir's (host 0, atomically); leaves an equal one untouched."""
    path = Path(workdir) / CONFIG_FILE
    if path.exists() and not _stored_differences(path, config, ignore):
        return
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial_path = path.with_suffix(".partial")
        partial_path.write_text(json.dumps(_kept(config, ignore), indent=2, sort_keys=True))
        partial_path.rename(path)  # atomic: a kill never leaves a half-written config


def _stored_differences(path: Path, config: Any, ignore: Iterable[str]) -> list[str]:
    """How the config differs from the one stored at `path` ([] if none is stored)."""
    if not path.exists():
        return []
    stored = {k: v for k, v in json.loads(path.read_text()).items() if k not in set(ignore)}
    return config_differences(stored, _kept(config, ignore))


def _kept(config: Any, ignore: Iterable[str]) -> dict[str, Any]:
    """The config's fingerprint without the keys a run may change freely."""
    return {k: v for k, v in config_fingerprint(config).items() if k not in set(ignore)}
