"""Hugging Face checkpoint name maps: moving weights between an HF state dict and an NNX module.

A family describes its checkpoint as a list of `WeightSpec`s (HF name, NNX variable path, layout
change each way); `assign_hf_tensors` validates a whole state dict (`{name: np.ndarray}`) against
them before assigning anything, and `collect_hf_tensors` writes the module back out under HF names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

Path = tuple[str | int, ...]


def _identity(array: np.ndarray) -> np.ndarray:
    """Returns `array` unchanged."""
    return array


def _transpose(array: np.ndarray) -> np.ndarray:
    """Swaps the two axes of a matrix (PyTorch `(out, in)` <-> Flax `(in, out)`)."""
    return np.ascontiguousarray(array.T)


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One checkpoint tensor: its HF name, the NNX variable it fills, and the layout change.

    `aliases` are other HF names accepted on load (legacy `gamma`/`beta`, a missing `bert.` prefix).
    `optional` tensors keep their initial value when the checkpoint lacks them (new task heads).
    """

    hf_name: str
    path: Path
    to_flax: Callable[[np.ndarray], np.ndarray] = _identity
    to_hf: Callable[[np.ndarray], np.ndarray] = _identity
    aliases: tuple[str, ...] = ()
    optional: bool = False


def linear_specs(
    hf_prefix: str,
    path: Path,
    *,
    bias: bool = True,
    optional: bool = False,
    alias_prefixes: Sequence[str] = (),
) -> list[WeightSpec]:
    """Specs of a PyTorch `nn.Linear` (`weight` (out, in), `bias`) as a Flax `Linear`.

    `alias_prefixes` are other module names under which a checkpoint may hold the same layer.
    """
    specs = [
        WeightSpec(
            f"{hf_prefix}.weight",
            (*path, "kernel"),
            _transpose,
            _transpose,
            aliases=tuple(f"{alias}.weight" for alias in alias_prefixes),
            optional=optional,
        )
    ]
    if bias:
        specs.append(
            WeightSpec(
                f"{hf_prefix}.bias",
                (*path, "bias"),
                aliases=tuple(f"{alias}.bias" for alias in alias_prefixes),
                optional=optional,
            )
        )
    return specs


def norm_specs(
    hf_prefix: str,
    path: Path,
    *,
    bias: bool = True,
    optional: bool = False,
    alias_prefixes: Sequence[str] = (),
) -> list[WeightSpec]:
    """Specs of a PyTorch LayerNorm/RMSNorm (`weight`, `bias`; legacy `gamma`, `beta`)."""
    prefixes = (hf_prefix, *alias_prefixes)
    specs = [
        WeightSpec(
            f"{hf_prefix}.weight",
            (*path, "scale"),
            aliases=(
                *(f"{p}.weight" for p in prefixes[1:]),
                *(f"{p}.gamma" for p in prefixes),
            ),
            optional=optional,
        )
    ]
    if bias:
        specs.append(
            WeightSpec(
                f"{hf_prefix}.bias",
                (*path, "bias"),
                aliases=(*(f"{p}.bias" for p in prefixes[1:]), *(f"{p}.beta" for p in prefixes)),
                optional=optional,
            )
        )
    return specs


def embed_specs(hf_prefix: str, path: Path, *, optional: bool = False) -> list[WeightSpec]:
    """Specs of a PyTorch `nn.Embedding` as an `nnx.Embed`."""
    return [WeightSpec(f"{hf_prefix}.weight", (*path, "embedding"), optional=optional)]


def with_prefix(specs: Sequence[WeightSpec], prefix: str, *, accept_bare: bool) -> list[WeightSpec]:
    """Prefixes every HF name with `prefix`; `accept_bare` also accepts the unprefixed names."""
    out = []
    for spec in specs:
        names = (spec.hf_name, *spec.aliases)
        aliases = tuple(prefix + name for name in names[1:])
        if accept_bare:
            aliases += names
        out.append(dataclasses.replace(spec, hf_name=prefix + spec.hf_name, aliases=aliases))
    return out


def accept_prefixed(specs: Sequence[WeightSpec], prefix: str) -> list[WeightSpec]:
    """`specs` also accepting each name with `prefix` on load (a backbone in a task checkpoint)."""
    return [
        dataclasses.replace(
            spec,
            aliases=(*spec.aliases, *(prefix + name for name in (spec.hf_name, *spec.aliases))),
        )
        for spec in specs
    ]


def nested(specs: Sequence[WeightSpec], attribute: str) -> list[WeightSpec]:
    """`specs` of a submodule held as `attribute`: paths under it, HF names under `attribute.`
    (the bare names accepted on load too)."""
    return [
        dataclasses.replace(spec, path=(attribute, *spec.path))
        for spec in with_prefix(specs, f"{attribute}.", accept_bare=True)
    ]


def variable_at(module: nnx.Module, path: Path) -> nnx.Variable:
    """The NNX variable at `path` (attribute names and list indices) inside `module`."""
    node: Any = module
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    if not isinstance(node, nnx.Variable):
        raise TypeError(f"{'/'.join(map(str, path))} is not an NNX variable")
    return node


def _find_tensor(spec: WeightSpec, tensors: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The checkpoint tensor for `spec` under its name or one of its aliases, else None."""
    for name in (spec.hf_name, *spec.aliases):
        if name in tensors:
            return tensors[name]
    return None


def assign_hf_tensors(
    module: nnx.Module,
    specs: Sequence[WeightSpec],
    tensors: Mapping[str, np.ndarray],
    *,
    family: str,
) -> None:
    """Fills `module` from an HF state dict, after checking every name and shape first.

    Raises ValueError naming the missing required keys, or the key and both shapes of a tensor whose
    shape disagrees with the config; in either case nothing has been assigned.
    """
    missing, mismatched, planned = [], [], []
    for spec in specs:
        array = _find_tensor(spec, tensors)
        if array is None:
            if not spec.optional:
                missing.append(spec.hf_name)
            continue
        variable = variable_at(module, spec.path)
        value = spec.to_flax(np.asarray(array))
        expected = tuple(variable.get_value().shape)
        if tuple(value.shape) != expected:
            flax_shape = tuple(np.shape(spec.to_hf(np.zeros(expected, np.float32))))
            mismatched.append(
                f"{spec.hf_name}: checkpoint shape {tuple(np.shape(array))}, "
                f"config expects {flax_shape}"
            )
            continue
        planned.append((variable, value))
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        shown = ", ".join(missing[:8]) + more
        raise ValueError(
            f"The {family} checkpoint lacks {len(missing)} required tensor(s): {shown}. "
            "Check that the checkpoint matches the config (model_type, layer count) and is "
            "complete."
        )
    if mismatched:
        raise ValueError(
            f"The {family} checkpoint disagrees with its config: " + "; ".join(mismatched)
        )
    for variable, value in planned:
        variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))


def collect_hf_tensors(module: nnx.Module, specs: Sequence[WeightSpec]) -> dict[str, np.ndarray]:
    """The HF state dict of `module` (float32 numpy arrays for floating parameters)."""
    tensors = {}
    for spec in specs:
        value = np.asarray(variable_at(module, spec.path)[...])
        if np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16":
            value = value.astype(np.float32)
        tensors[spec.hf_name] = np.ascontiguousarray(spec.to_hf(value))
    return tensors
