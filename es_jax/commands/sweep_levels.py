"""How a sweep prunes: each scorer's scores, and every level of a curve as one nested levels tree.

A score method (magnitude, Wanda, random) selects once per curve: `levels_of` gives every level of
the curve in one uint8 per target weight (`pruning.levels`; magnitude's |w| computed inside the
selection), which the evaluators apply inside their compiled forward pass. A sequential method
(SparseGPT, Wanda as its reference runs it) prunes block by block once per level and yields the
pruned parameters with their mask as a one-level tree. Both yield `Pruned` levels, placed on the
load's mesh like the parameters (`place`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from es_jax import mesh as mesh_lib
from es_jax.commands.sweep_config import SEQUENTIAL_SCORERS, Pattern
from es_jax.evaluate import tasks as task_registry
from es_jax.evaluate.evaluators import DENSE

if TYPE_CHECKING:
    from es_jax.commands.sweep import ModelRun


def place(tree: Any, mesh: Mesh | None) -> Any:
    """Parameters, masks or level arrays sharded on the mesh by `es_jax.mesh.state_shardings`
    (as they are when `mesh` is None)."""
    return tree if mesh is None else mesh_lib.shard(tree, mesh)


def calibration(prepared: ModelRun, config: Any, settings: Any) -> list[dict]:
    """The model entry's calibration batches (Wanda, SparseGPT)."""
    return task_registry.calibration_batches(
        prepared.tokenizer,
        config.data_dir,
        settings.calibration_length,
        settings.calibration_blocks,
        settings.batch_size,
        corpus=settings.calibration_text,
    )


class Scores(NamedTuple):
    """A scorer's scores: a tree (None off target) and the transform the selection applies to
    each leaf (magnitude: the weights themselves and `jnp.abs`, so no |w| tree is stored)."""

    tree: Any
    transform: Callable[[jax.Array], jax.Array] | None = None


def scores_of(scorer: str, prepared: ModelRun, config: Any, settings: Any) -> Scores:
    """Pruning scores of the target weights: |W| (computed inside the selection), Wanda's
    |W| * ||X||, or random."""
    from es_jax import models, pruning
    from es_jax.pruning.scores import map_targets

    params, where = prepared.params, prepared.where
    if scorer == "magnitude":
        return Scores(map_targets(params, where, lambda _, __, leaf: leaf), jnp.abs)
    if scorer == "random":
        return Scores(pruning.random_scores(params, jax.random.key(config.seed), where=where))
    norms = models.activation_norms(prepared.model, calibration(prepared, config, settings))
    return Scores(pruning.wanda(params, norms, where=where))


def levels_of(scores: Scores, pattern: Pattern, sparsities: Sequence[float]) -> Any:
    """Every level of one selection as a `pruning.levels` tree (uint8 on targets): the nested
    unstructured levels of `sparsities`, or an N:M pattern's one level (index 0). A scope that
    selects within each leaf (layerwise, per_output) selects one leaf at a time
    (`leaf_by_leaf_levels`)."""
    from es_jax import pruning

    if pattern.is_n_of_m:
        return n_of_m_levels(scores.tree, pattern.n, pattern.m, scores.transform)
    if pattern.name != "global":
        return leaf_by_leaf_levels(scores, pattern.name, sparsities)
    return pruning.levels(scores.tree, list(sparsities), transform=scores.transform)


def leaf_by_leaf_levels(scores: Scores, scope: str, sparsities: Sequence[float]) -> Any:
    """`pruning.levels(scores.tree, sparsities, scope, transform)` for a scope whose selection
    stays within each leaf (layerwise, per_output), one leaf at a time: the same levels, while
    the selection's temporaries are one leaf's instead of every leaf's at once (one compiled
    program per leaf shape). Errors name the leaf."""
    from es_jax import pruning
    from es_jax.pruning.paths import path_string

    def one(path: Any, leaf: jax.Array) -> jax.Array:
        name = path_string(path)
        chosen = pruning.levels({name: leaf}, list(sparsities), scope=scope,
                                transform=scores.transform)
        return jax.block_until_ready(chosen[name])

    return jax.tree_util.tree_map_with_path(one, scores.tree)


@functools.partial(jax.jit, static_argnames=("n", "m", "transform"))
def n_of_m_levels(
    scores: Any, n: int, m: int, transform: Callable[[jax.Array], jax.Array] | None
) -> Any:
    """The N:M mask of `transform(scores)` as a one-level levels tree: 1 where kept, 0 where
    pruned (so `pruning.mask_at(tree, 0)` is the mask)."""
    from es_jax import pruning

    if transform is not None:
        scores = jax.tree.map(transform, scores)
    return as_levels(pruning.n_of_m(scores, n=n, m=m))


def as_levels(mask: Any) -> Any:
    """A bool mask as a one-level levels tree (uint8: 1 kept, 0 pruned; None stays None)."""
    return jax.tree.map(lambda keep: keep.astype(jnp.uint8), mask)


def unpruned_levels(params: Any, where: str, mesh: Mesh | None) -> Any:
    """A levels tree of zeros on the target leaves (None elsewhere), created in place on the
    mesh: with level DENSE (-1) it prunes nothing, so the dense model goes through the
    evaluators' one compiled program."""
    from es_jax.pruning.scores import map_targets

    def zeros(_: int, __: str, leaf: jax.Array) -> jax.Array:
        placement = None if mesh is None else jax.sharding.NamedSharding(
            mesh, mesh_lib.leaf_spec(leaf.shape, mesh_lib.fsdp_size(mesh))
        )
        return jnp.zeros(leaf.shape, jnp.uint8, device=placement)

    return map_targets(params, where, zeros)


class Pruned(NamedTuple):
    """One level as the evaluators take it: parameters (the dense ones, or a sequential method's
    pruned ones), a levels tree whose level `index` is the level's mask (DENSE: nothing
    pruned), and the seconds its pruning took."""

    params: Any
    levels: Any
    index: int
    seconds: float


def mask_of(pruned: Pruned) -> Any:
    """The level's bool mask (`pruning.mask_at`); None for the dense model."""
    from es_jax import pruning

    return None if pruned.index == DENSE else pruning.mask_at(pruned.levels, pruned.index)


class ScoreMethod:
    """A scorer whose scores are computed once: every curve's levels come from one selection
    (`levels_of`: one uint8 per target weight), which the evaluators apply inside their
    compiled forward pass. A level's seconds are its share of the selection."""

    def __init__(self, scorer: str, prepared: ModelRun, config: Any, settings: Any):
        start = time.perf_counter()
        self.scores = jax.block_until_ready(scores_of(scorer, prepared, config, settings))
        self.seconds = time.perf_counter() - start  # the scores' own cost, once per load
        self.mesh = prepared.mesh
        self.params = prepared.params

    def levels(self, pattern: Pattern, sparsities: Sequence[float]) -> Iterator[Pruned]:
        """Each sparsity's level (one N:M level for an N:M pattern), all in one levels tree."""
        if not sparsities:
            return
        count = 1 if pattern.is_n_of_m else len(sparsities)
        start = time.perf_counter()
        tree = place(jax.block_until_ready(levels_of(self.scores, pattern, sparsities)), self.mesh)
        share = (time.perf_counter() - start) / count
        for index in range(count):
            yield Pruned(self.params, tree, index, share)


class SequentialMethod:
    """SparseGPT or Wanda run as their references do: block by block on calibration text, with
    inputs through the pruned blocks (`models.prune_sequential`), once per level."""

    def __init__(self, scorer: str, prepared: ModelRun, config: Any, settings: Any):
        self.method = "wanda" if scorer == "wanda_sequential" else scorer
        self.model = prepared.model
        self.mesh = prepared.mesh
        self.batches = calibration(prepared, config, settings)
        self.options = {"where": prepared.where, "block_size": settings.sparsegpt_block_size,
                        "dampening": settings.sparsegpt_dampening}
        self.seconds = 0.0  # no work shared between levels

    def levels(self, pattern: Pattern, sparsities: Sequence[float]) -> Iterator[Pruned]:
        """The pruned parameters of each sparsity, each pruned from the dense model, with their
        mask as a one-level levels tree (placed like the dense parameters)."""
        from es_jax import models

        for sparsity in sparsities:
            shape = (
                {"n": pattern.n, "m": pattern.m} if pattern.is_n_of_m else {"sparsity": sparsity}
            )
            start = time.perf_counter()
            pruned, mask = models.prune_sequential(
                self.model, self.batches, self.method, **shape, **self.options
            )
            jax.block_until_ready(pruned)
            seconds = time.perf_counter() - start
            yield Pruned(place(pruned, self.mesh), place(as_levels(mask), self.mesh), 0, seconds)


def method_of(
    scorer: str, prepared: ModelRun, config: Any, settings: Any
) -> ScoreMethod | SequentialMethod:
    """How a scorer prunes: one selection over its scores, or block by block per level."""
    if scorer in SEQUENTIAL_SCORERS:
        return SequentialMethod(scorer, prepared, config, settings)
    return ScoreMethod(scorer, prepared, config, settings)
