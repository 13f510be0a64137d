"""Input-activation statistics for activation-aware pruning (Wanda's ||X||).

`activation_norms(model, batches)` runs the model over calibration batches in one jitted function
and returns, for every selected kernel, the L2 norm over all tokens of each of its input features:
`{kernel path: (in_features,)}`, the `input_norms` that `pruning.wanda` takes. Every token of a
batch counts, padding included, so calibrate on unpadded windows of text (as Wanda does).
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


@nnx.jit
def _input_squares(model: nnx.Module, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """{kernel path: per-feature sum of squared inputs} of every recording `Linear` on one batch."""
    _, sums = nnx.capture(_forward, layers.InputSquares)(model, batch)
    paths, leaves = pruning.leaf_paths(sums), jax.tree.leaves(sums)
    return {
        path.rsplit("/", 1)[0] + "/" + KERNEL: leaf
        for path, leaf in zip(paths, leaves, strict=True)
    }


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


def activation_norms(
    model: nnx.Module,
    batches: Iterable[Mapping[str, Any]],
    where: Selector | None = None,
) -> dict[str, jax.Array]:
    """{kernel path: (in_features,) L2 norm of its inputs over every token of every batch}.

    batches: dicts of model inputs (e.g. `input_ids`, `attention_mask`; `pixel_values` for ViT).
    where: selector of the kernels (default: the model family's PRUNABLE). Runs in eval mode.
    """
    kernels = selected_kernels(model, where)
    recorder = nnx.view(model, record_inputs=True, deterministic=True, raise_if_not_found=False)
    totals: dict[str, jax.Array] | None = None
    for batch in batches:
        squares = _input_squares(recorder, {k: jnp.asarray(v) for k, v in batch.items()})
        totals = squares if totals is None else jax.tree.map(jnp.add, totals, squares)
    if totals is None:
        raise ValueError("activation_norms needs at least one calibration batch; got none.")
    unrecorded = [path for path in kernels if path not in totals]
    if unrecorded:
        raise ValueError(
            f"No inputs were recorded for {unrecorded[:5]}: only kernels of layers.Linear modules "
            "that the forward pass calls have activation norms. Narrow `where`."
        )
    return {path: jnp.sqrt(totals[path]) for path in kernels}
