"""Input-activation statistics for activation-aware pruning (Wanda's ||X||, SparseGPT's X^T X).

`activation_norms(model, batches)` runs the model over calibration batches in one jitted function
and returns, for every selected kernel, the L2 norm over all tokens of each of its input features:
`{kernel path: (in_features,)}`, the `input_norms` that `pruning.wanda` takes.
`activation_grams(model, batches)` returns the sum over all tokens of x x^T of each selected
kernel's inputs x, `{kernel path: (in, in)}`, the `hessian` that `pruning.sparsegpt` takes. Every
token of a batch counts, padding included, so calibrate on unpadded windows of text (as Wanda and
SparseGPT do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from es_jax import pruning
from es_jax.models import hub, layers

KERNEL = "kernel"

Selector = str | Callable[[str, Any], bool]


def _forward(model: nnx.Module, batch: Mapping[str, jax.Array]) -> Any:
    """Calls the model on a batch of keyword inputs."""
    return model(**batch)


def _kernel_paths(sums: Any) -> dict[str, jax.Array]:
    """{kernel path: statistic} from a captured tree of per-`Linear` statistics."""
    paths, leaves = pruning.leaf_paths(sums), jax.tree.leaves(sums)
    return {
        path.rsplit("/", 1)[0] + "/" + KERNEL: leaf
        for path, leaf in zip(paths, leaves, strict=True)
    }


@nnx.jit
def _input_squares(model: nnx.Module, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """{kernel path: per-feature sum of squared inputs} of every recording `Linear` on one batch."""
    _, sums = nnx.capture(_forward, layers.InputSquares)(model, batch)
    return _kernel_paths(sums)


@nnx.jit
def _input_grams(model: nnx.Module, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """{kernel path: sum of x x^T over input tokens} of every recording `Linear` on one batch."""
    _, sums = nnx.capture(_forward, layers.InputGram)(model, batch)
    return _kernel_paths(sums)


def selected_kernels(model: nnx.Module, where: Selector | None) -> list[str]:
    """Paths of the parameters `where` selects (default: the family's PRUNABLE kernels)."""
    selector = pruning.select(hub.prunable(model) if where is None else where)
    params = nnx.state(model, nnx.Param)
    paths, leaves = pruning.leaf_paths(params), jax.tree.leaves(params)
    chosen = [path for path, leaf in zip(paths, leaves, strict=True) if selector(path, leaf)]
    if not chosen:
        raise ValueError(
            f"The selector {where!r} matches no parameter of {type(model).__name__}; "
            f"paths look like {paths[:3]}."
        )
    return chosen


def _recorded_sums(
    model: nnx.Module,
    batches: Iterable[Mapping[str, Any]],
    where: Selector | None,
    record: Callable[[nnx.Module, dict], dict[str, jax.Array]],
    view: dict[str, bool],
) -> dict[str, jax.Array]:
    """{selected kernel path: statistic summed over every batch}, recorded in eval mode."""
    kernels = selected_kernels(model, where)
    recorder = nnx.view(model, **view, deterministic=True, raise_if_not_found=False)
    totals: dict[str, jax.Array] | None = None
    for batch in batches:
        sums = record(recorder, {k: jnp.asarray(v) for k, v in batch.items()})
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("activation statistics need at least one calibration batch; got none.")
    unrecorded = [path for path in kernels if path not in totals]
    if unrecorded:
        raise ValueError(
            f"No inputs were recorded for {unrecorded[:5]}: only kernels of layers.Linear modules "
            "that the forward pass calls have activation statistics. Narrow `where`."
        )
    return {path: totals[path] for path in kernels}


def activation_norms(
    model: nnx.Module,
    batches: Iterable[Mapping[str, Any]],
    where: Selector | None = None,
) -> dict[str, jax.Array]:
    """{kernel path: (in_features,) L2 norm of its inputs over every token of every batch}.

    batches: dicts of model inputs (e.g. `input_ids`, `attention_mask`; `pixel_values` for ViT).
    where: selector of the kernels (default: the model family's PRUNABLE). Runs in eval mode.
    """
    squares = _recorded_sums(model, batches, where, _input_squares, {"record_inputs": True})
    return {path: jnp.sqrt(total) for path, total in squares.items()}


def activation_grams(
    model: nnx.Module,
    batches: Iterable[Mapping[str, Any]],
    where: Selector | None = None,
) -> dict[str, jax.Array]:
    """{kernel path: (in, in) float32 sum of x x^T over every input token x of every batch}.

    Arguments as `activation_norms`. The diagonal is the squared norm `activation_norms` takes
    the root of.
    """
    return _recorded_sums(model, batches, where, _input_grams, {"record_gram": True})
