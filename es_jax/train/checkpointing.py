"""Orbax checkpoints of a training run: save schedule, exact resume, corrupt-step skipping.

A step's checkpoint holds the train state pytree (parameters, optimizer state, step, RNG key data),
the grain iterator state of every host, and a 64-bit checksum of every array of the train state, so
a run restored from it continues exactly as if it had never stopped. A checkpoint that cannot be
read back as saved (files missing or cut short, or arrays whose bits no longer match their
checksums) raises `UnreadableCheckpoint`: resuming moves it aside with a warning naming it and
takes the one before it; readers of finished runs skip it. Checkpoints saved before checksums
existed are read unchecked. The run's config is stored beside the checkpoints, and a different
config pointed at the same directory is refused unless forced.

Directories may be local or `gs://` URLs: every path here is an `etils.epath.Path`, as Orbax's own
(`as_path`), so a bucket path reaches Orbax intact. Orbax decides which steps are saved
(`open_manager`): the scheduled ones, and the step that `jax.distributed`'s preemption service
agrees on once a host is told it will be preempted, so a preempted run saves where it stopped.

On many hosts every host restores the same step (host 0 proposes each step in turn) and a
checkpoint is moved aside only when no host can read it (`verdict` of every host's attempt); one
that some hosts read and others do not is left in place and the one before it is taken. Each host
reads its part without waiting for the others (no barrier a failing host could skip), so hosts
that disagree never deadlock.

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
import enum
import json
import os
import re
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils

from es_jax.mesh import sync_hosts

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
CONFIG_FILE = "config.json"
CHECKSUM_ITEM = "checksums"
# Two 32-bit lanes, each seeded differently: a 64-bit digest per array.
_LANE_SEEDS = (0x243F6A88, 0x85A308D3)


class UnreadableCheckpoint(OSError):
    """A checkpoint that cannot be read back as saved: files missing, cut short, or altered."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"Checkpoint {path} could not be read ({reason})")
        self.path, self.reason = epath.Path(path), reason


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: a URL (gs://bucket/...) exactly as given, a local path with `~`
    expanded and made absolute (as Orbax wants its directories)."""
    if is_url(path):
        return epath.Path(path)
    return epath.Path(path).expanduser().absolute()


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (`SCHEME://...`, e.g. gs://bucket/run), not a local path."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", os.fspath(path)) is not None


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


def open_manager(
    directory: str | os.PathLike,
    async_save: bool = True,
    save_steps: Collection[int] | None = None,
) -> ocp.CheckpointManager:
    """A manager of the checkpoints in `directory` (local or gs://) that keeps every checkpoint
    and saves in the background; Orbax's save policy (`save_policy(save_steps)`) decides which
    steps `save` writes."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
        save_decision_policy=save_policy(save_steps),
    )
    return ocp.CheckpointManager(as_path(directory), options=options,
                                 item_handlers=_item_handlers())


def save_policy(save_steps: Collection[int] | None) -> ocp.checkpoint_managers.AnySavePolicy:
    """Saves the steps of `save_steps` (None: any step after the newest saved one) and the step a
    preemption was announced for: the sync point `jax.distributed`'s preemption service sets once
    any host receives SIGTERM, the same step on every host (needs `jax.distributed.initialize`)."""
    policies = ocp.checkpoint_managers
    scheduled = (policies.FixedIntervalPolicy(1) if save_steps is None
                 else policies.SpecificStepsPolicy(frozenset(save_steps)))
    return policies.AnySavePolicy([scheduled, policies.PreemptionCheckpointingPolicy()])


def _item_handlers() -> dict[str, Any]:
    """The handler of each item of a checkpoint: train state, data-iterator state, checksums."""
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": grain_checkpoint.CheckpointHandler(),
        CHECKSUM_ITEM: ocp.JsonCheckpointHandler(),
    }


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict[str, Any] | None
) -> bool:
    """Starts saving the train state, its checksums and this host's data-iterator state at `step`
    if the manager's save policy asks for it (a scheduled step, or the step a preemption was
    announced for, and newer than the newest saved); returns whether it did. Every host calls it.

    The checksums are read back to the host before Orbax starts: the one wait this adds is for the
    state itself, which Orbax waits for anyway to copy it off the devices.
    """
    if not manager.should_save(step):
        return False
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain_checkpoint.CheckpointSave(IteratorStateSnapshot(data_state)),
            **{CHECKSUM_ITEM: ocp.args.JsonSave(state_checksums(state))},
        ),
    )


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
    mismatch = checksum_mismatch(saved, state_checksums(tree))
    if mismatch is not None:
        raise UnreadableCheckpoint(checkpoint_path(manager, step), mismatch)


def checksum_mismatch(saved: dict[str, str] | None, read: dict[str, str]) -> str | None:
    """Why arrays whose checksums are `read` are not those `saved` (naming up to three), or None
    if every one matches (or nothing was saved: a checkpoint from before checksums)."""
    if saved is None:
        return None
    changed = [path for path, digest in read.items() if saved.get(path) != digest]
    if not changed:
        return None
    return (f"checksum mismatch: {', '.join(changed[:3])}"
            + (f" and {len(changed) - 3} more arrays" if len(changed) > 3 else "")
            + " differ from what was saved; its files were altered after saving")


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


class Restored(NamedTuple):
    """A checkpoint read back for resuming: its step, train state and data-iterator state."""

    step: int
    state: Any
    data_state: dict[str, Any] | None


class Verdict(enum.Enum):
    """What the hosts found when each read its part of one checkpoint."""

    READABLE = "every host read it"
    UNREADABLE = "no host could read it"
    DISPUTED = "some hosts read it, others could not"


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Restored | None:
    """The newest checkpoint that every host reads as saved, or None if there is none.

    Every host calls it and gets the same step. Steps are tried newest first, each one host 0
    proposes; one that no host can read is moved aside (`quarantine`), one that only some hosts
    can read is left in place with a warning, and the one before it is tried. A step whose
    metadata names a train state of another layout is a config error (ValueError), not damage.
    """
    step = agreed_step(manager.all_steps(), below=None)
    while step is not None:
        restored = _restore_agreed(manager, step, abstract_state)
        if restored is not None:
            return restored
        step = agreed_step(manager.all_steps(), below=step)
    return None


def _restore_agreed(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> Restored | None:
    """Step `step` if every host reads it with arrays matching their checksums; else None, having
    moved it aside if no host could read it (or warned that hosts disagree)."""
    try:
        read, reason = read_step_here(manager, step, abstract_state), None
    except UnreadableCheckpoint as error:
        read, reason = None, error.reason
    readable = each_host(reason is None)
    if all(readable):  # every host holds its arrays: the checksums can be computed together
        reason = checksum_mismatch(read.checksums, state_checksums(read.state))
        readable = each_host(reason is None)
    decision = verdict(readable)
    if decision is Verdict.READABLE:
        return Restored(step, read.state, read.data_state)
    if any(each_host(other_layout(manager, step, abstract_state))):
        _refuse_other_layout(manager, step)
    if decision is Verdict.UNREADABLE:
        quarantine(manager, step, reason)
    else:
        here = "this host read it" if reason is None else f"this host could not: {reason}"
        warnings.warn(
            f"Checkpoint {checkpoint_path(manager, step)} was read by hosts "
            f"{[i for i, ok in enumerate(readable) if ok]} but not by hosts "
            f"{[i for i, ok in enumerate(readable) if not ok]} ({here}); left it in place and "
            "resuming from the checkpoint before it.",
            stacklevel=3,
        )
    return None


def verdict(readable: Sequence[bool]) -> Verdict:
    """What hosts that read one checkpoint found, from each host's `readable` flag."""
    if not readable:
        raise ValueError("verdict needs the flag of at least one host; got none.")
    if all(readable):
        return Verdict.READABLE
    return Verdict.UNREADABLE if not any(readable) else Verdict.DISPUTED


def agreed_step(steps: Iterable[int], below: int | None) -> int | None:
    """Host 0's newest of its `steps` under `below` (None: of them all), the same on every host;
    None when host 0 has none left."""
    mine = newest_below(steps, below)
    agreed = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if mine is None else mine)))
    return None if agreed < 0 else agreed


def newest_below(steps: Iterable[int], below: int | None) -> int | None:
    """The largest of `steps` smaller than `below` (None: the largest), or None if there is none."""
    candidates = [step for step in steps if below is None or step < below]
    return max(candidates) if candidates else None


def each_host(flag: bool) -> list[bool]:
    """Every host's `flag`, in process order (each host passes its own; all must call it)."""
    return [bool(f) for f in np.ravel(multihost_utils.process_allgather(np.int32(flag)))]


class StepRead(NamedTuple):
    """This host's part of one checkpoint: train state, data-iterator state, saved checksums (None
    for a checkpoint saved before checksums existed)."""

    state: Any
    data_state: dict[str, Any] | None
    checksums: dict[str, str] | None


def read_step_here(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> StepRead:
    """This host's shards of step `step`'s train state, its data-iterator state and the saved
    checksums, read without waiting for other hosts (Orbax's item handlers alone, no barrier), not
    yet checked against the checksums; UnreadableCheckpoint naming it if they cannot be read."""
    directory = checkpoint_path(manager, step)
    items = {"state": ocp.args.StandardRestore(abstract_state),
             "data": grain_checkpoint.CheckpointRestore(IteratorStateSnapshot())}
    handler = ocp.CompositeCheckpointHandler(**_item_handlers())
    with _reading(manager, step):
        if (directory / CHECKSUM_ITEM).exists():
            items[CHECKSUM_ITEM] = ocp.args.JsonRestore()
        restored = handler.restore(directory, args=ocp.args.Composite(**items))
    handler.close()
    checksums = restored[CHECKSUM_ITEM] if CHECKSUM_ITEM in items else None
    return StepRead(restored["state"], restored["data"].state, checksums)


def checkpoint_path(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Where a step's checkpoint lives."""
    return epath.Path(manager.directory) / str(step)


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


def quarantine(manager: ocp.CheckpointManager, step: int, reason: str) -> epath.Path:
    """Moves an unreadable step out of the checkpoint directory (host 0 moves it, every host waits
    for that and re-lists the steps), warning with its name. Every host calls it."""
    source = checkpoint_path(manager, step)
    target = epath.Path(manager.directory).parent / CORRUPT_DIR / str(step)
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.rmtree()
        source.rename(target)
    sync_hosts(f"quarantine {source}")
    manager.reload()
    warnings.warn(
        f"Checkpoint {source} could not be read ({reason}); moved it to {target} and resuming "
        "from the checkpoint before it.",
        stacklevel=4,
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


def other_layout(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> bool:
    """Whether step `step`'s metadata can be read and names a train state of other shapes or
    structure than `abstract_state` (a checkpoint of another model, not a damaged one)."""
    layout = saved_layout(manager, step)
    return layout is not None and layout != _layout(abstract_state)


def check_layout(manager: ocp.CheckpointManager, abstract_state: Any) -> None:
    """Refuses checkpoints of another model: the newest one whose metadata can be read must hold
    a train state of the shapes and structure of `abstract_state` (reads only)."""
    for step in sorted(manager.all_steps(), reverse=True):
        layout = saved_layout(manager, step)
        if layout is not None:
            if layout != _layout(abstract_state):
                _refuse_other_layout(manager, step)
            return


def _refuse_other_layout(manager: ocp.CheckpointManager, step: int) -> None:
    """The ValueError for checkpoint `step`, which holds a train state of another model."""
    raise ValueError(
        f"Checkpoint {checkpoint_path(manager, step)} holds a train state of another shape "
        "or structure than this config builds; it was written with another config. Use "
        "another --workdir for this config."
    )


def open_reader(directory: str | os.PathLike) -> ocp.CheckpointManager:
    """A read-only manager over the checkpoints in `directory`, for reading them as pytrees.

    The data item is named with its handler although readers never restore it: Orbax otherwise
    warns about it once per checkpoint.
    """
    return ocp.CheckpointManager(
        as_path(directory),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data": grain_checkpoint.CheckpointHandler(),
                       CHECKSUM_ITEM: ocp.JsonCheckpointHandler()},
    )


def read_state(directory: str | os.PathLike, step: int) -> Any:
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

    directory: epath.Path
    steps: list[int]
    config: dict[str, Any]
    read_params: Callable[[int], dict[str, Any]]


def checkpoint_dir(run_dir: str | os.PathLike) -> epath.Path:
    """Where a training run keeps its checkpoints."""
    return epath.Path(run_dir) / CHECKPOINT_DIR


def find_runs(workdir: str | os.PathLike) -> list[epath.Path]:
    """The run directories under `workdir`: itself if it holds checkpoints, else its children."""
    workdir = epath.Path(workdir)
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


def open_run(run_dir: str | os.PathLike) -> RunReader:
    """A run's saved steps (ascending), its stored config ({} if none), a reader of its params."""
    run_dir = epath.Path(run_dir)
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
    workdir: str | os.PathLike, config: Any, force: bool, ignore: Iterable[str] = ("force",)
) -> None:
    """Refuses a config that differs from the one stored in the workdir, unless forced (reads
    only: `store_config` writes it once everything else has been checked)."""
    path = epath.Path(workdir) / CONFIG_FILE
    differences = _stored_differences(path, config, ignore)
    if differences and not force:
        raise ValueError(
            f"Workdir {workdir} holds a run with a different config ({path}):\n  "
            + "\n  ".join(differences)
            + "\nUse another --workdir, or pass --config.force=True to continue this run "
            "with the new config."
        )


def store_config(
    workdir: str | os.PathLike, config: Any, ignore: Iterable[str] = ("force",)
) -> None:
    """Stores the config as the workdir's (host 0, atomically); leaves an equal one untouched."""
    path = epath.Path(workdir) / CONFIG_FILE
    if path.exists() and not _stored_differences(path, config, ignore):
        return
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial_path = path.with_suffix(".partial")
        partial_path.write_text(json.dumps(_kept(config, ignore), indent=2, sort_keys=True))
        partial_path.replace(path)  # atomic on a local disk: no half-written config after a kill


def _stored_differences(path: epath.Path, config: Any, ignore: Iterable[str]) -> list[str]:
    """How the config differs from the one stored at `path` ([] if none is stored)."""
    if not path.exists():
        return []
    stored = _without(json.loads(path.read_text()), ignore)
    return config_differences(stored, _kept(config, ignore))


def _kept(config: Any, ignore: Iterable[str]) -> dict[str, Any]:
    """The config's fingerprint without the keys a run may change freely (`_without`)."""
    return _without(config_fingerprint(config), ignore)


def _without(fingerprint: dict[str, Any], ignore: Iterable[str]) -> dict[str, Any]:
    """A config fingerprint (modified in place) without the `ignore` keys: top-level names, or
    dotted ones such as "data.cache_dir" for a key inside a group."""
    for dotted in ignore:
        *groups, name = dotted.split(".")
        group: Any = fingerprint
        for key in groups:
            group = group.get(key) if isinstance(group, dict) else None
        if isinstance(group, dict):
            group.pop(name, None)
    return fingerprint
