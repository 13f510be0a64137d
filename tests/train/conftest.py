"""Damage done to checkpoints on disk, as failing storage leaves it."""

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

FRACTIONS = (0.5, 0.25, 0.75, 0.125, 0.375, 0.625, 0.875)


def read_unchecked(checkpoint: Path) -> list[np.ndarray]:
    """Every array of a step's train state as Orbax alone reads it (no checksums)."""
    step = int(checkpoint.name)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(checkpoint.parent, options=options,
                                    item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    metadata = manager.item_metadata(step)["state"]
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args)))
    manager.close()
    return jax.tree.leaves(restored["state"])


def differ(left: list[np.ndarray], right: list[np.ndarray]) -> bool:
    """Whether any array's bytes differ."""
    return any(a.tobytes() != b.tobytes() for a, b in zip(left, right, strict=True))


def damage_silently(checkpoint: Path, count: int = 64) -> Path:
    """Inverts `count` bytes of one of a step's data files (its size unchanged) where Orbax alone
    still reads the state, with other values: what failing storage does unnoticed.

    Array files may be stored raw or compressed, so places are tried (largest file first, its
    middle first) until one changes values without an error. Returns the file changed.
    """
    original = read_unchecked(checkpoint)
    files = [p for p in (checkpoint / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    for data_file in sorted(files, key=lambda p: -p.stat().st_size):
        data = data_file.read_bytes()
        for offset in (int(len(data) * f) for f in FRACTIONS if len(data) * f + count <= len(data)):
            inverted = bytes(b ^ 0xFF for b in data[offset : offset + count])
            data_file.write_bytes(data[:offset] + inverted + data[offset + count :])
            try:
                if differ(read_unchecked(checkpoint), original):
                    return data_file
            except Exception:  # a place that Orbax notices is not what is wanted here
                pass
            data_file.write_bytes(data)
    raise AssertionError(f"no {count} bytes of {checkpoint} change its arrays unnoticed")


@pytest.fixture
def flip_bytes():
    """`damage_silently(checkpoint)`: 64 inverted bytes that Orbax alone reads without error."""
    return damage_silently
