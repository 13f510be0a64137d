"""Key paths and selectors over parameter pytrees (nnx.State, Linen dicts, any pytree).

A leaf's path is its keys joined by '/': dict keys, attribute names and sequence indices, e.g.
"encoder/layers/3/attention/query/kernel". The `.value` attribute through which an NNX Variable
exposes its array adds no component. A selector is a regex string, matched in full against the path,
or a callable `(path, leaf) -> bool`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
Selector = str | Callable[[str, Any], bool]

_VARIABLE_VALUE = "value"


def _key_name(key: Any) -> str:
    """The text of one key-path entry."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_string(key_path: Sequence[Any]) -> str:
    """Joins a jax key path with '/', dropping the trailing `.value` of an NNX Variable."""
    keys = list(key_path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == _VARIABLE_VALUE:
        keys = keys[:-1]
    return "/".join(_key_name(k) for k in keys)


def flatten(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    """The '/'-joined paths, the leaves and the treedef of a pytree."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_string(p) for p, _ in with_paths]
    return paths, [leaf for _, leaf in with_paths], treedef


def leaf_paths(tree: PyTree) -> list[str]:
    """The '/'-joined paths of a pytree's leaves, in leaf order."""
    return flatten(tree)[0]


def select(pattern: Selector) -> Callable[[str, Any], bool]:
    """A selector from a regex (matched in full against the path) or a `(path, leaf)` callable."""
    if callable(pattern):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(f"a selector is a regex string or a callable (path, leaf) -> bool, "
                        f"got {type(pattern).__name__}")
    compiled = re.compile(pattern)
    return lambda path, leaf: compiled.fullmatch(path) is not None


def default_selector(path: str, leaf: Any) -> bool:
    """Every floating-point leaf with at least two dimensions (the weight matrices)."""
    return jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 2


def target_flags(paths: list[str], leaves: list[Any], where: Selector | None) -> list[bool]:
    """Which leaves a selector chooses; refuses one that matches nothing or a non-float leaf."""
    selector = default_selector if where is None else select(where)
    flags = [bool(selector(path, leaf)) for path, leaf in zip(paths, leaves, strict=True)]
    if not any(flags):
        shown = ", ".join(paths[:5]) + (", ..." if len(paths) > 5 else "")
        raise ValueError(f"the selector {where!r} matches no leaf of the parameters; "
                         f"paths look like: {shown}")
    for path, leaf, flag in zip(paths, leaves, flags, strict=True):
        if flag and not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            raise ValueError(f"leaf {path!r} has dtype {jnp.asarray(leaf).dtype}: only "
                             f"floating-point leaves can be pruned; narrow the selector")
    return flags


def check_like(params: PyTree, other: PyTree, what: str) -> tuple[list[str], list[Any], list[Any]]:
    """Aligns `other` (a mask or scores tree, `None` off target) leaf by leaf with `params`.

    Returns the paths, the parameter leaves and the aligned leaves of `other`, or raises a
    ValueError naming the first leaf whose structure or shape differs.
    """
    paths, leaves, treedef = flatten(params)
    try:
        aligned = treedef.flatten_up_to(other)
    except (ValueError, TypeError) as error:
        raise ValueError(f"the {what} does not have the structure of the parameters: "
                         f"{error}") from None
    for path, leaf, item in zip(paths, leaves, aligned, strict=True):
        if item is not None and tuple(jnp.shape(item)) != tuple(jnp.shape(leaf)):
            raise ValueError(f"the {what} at {path!r} has shape {tuple(jnp.shape(item))} but the "
                             f"parameter has shape {tuple(jnp.shape(leaf))}")
    return paths, leaves, aligned
