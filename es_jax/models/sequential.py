"""Pruning a decoder block by block on calibration data: SparseGPT, Wanda and magnitude.

    pruned, mask = models.prune_sequential(model, batches, "sparsegpt", sparsity=0.5)
    pruned, mask = models.prune_sequential(model, batches, "wanda", n=2, m=4)

As the SparseGPT and Wanda references do: the calibration batches are embedded once; then for each
block in order, the inputs of its target kernels are recorded on the block as it stands (X^T X
for SparseGPT, the squared norms for Wanda), every target kernel of the block is pruned, and the
block's outputs with its pruned kernels become the next block's inputs. So each block sees
inputs propagated through the already pruned blocks before it. Magnitude pruning needs no data
(the batches are not read); it is here so that the three methods share one call and one rule:

- `sparsity`: unstructured, per kernel: magnitude removes round(s * size) of each kernel's
  weights by |w|, Wanda round(s * in) of each output unit's inputs by |W| * ||X|| (its
  per-output comparison), SparseGPT round(s * size) of each block of 128 input columns by its
  OBS score, compensating the error in the columns that follow (`pruning.sparsegpt`).
- `n` and `m`: keep n of every m consecutive inputs of each output unit (2:4, 4:8), by the same
  scores.

The model is not changed: the result is `(pruned params, mask)`, the model's `nnx.Param` state
with the pruned kernels in place (the other arrays shared with the model), and a mask tree of the
same structure, bool on the target kernels and None elsewhere (as `pruning.unstructured` gives).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from es_jax import pruning
from es_jax.models import hub, layers
from es_jax.pruning.scores import check_finite, norms_message, weights_message

METHODS = ("sparsegpt", "wanda", "magnitude")
KERNEL = "kernel"
# The statistic each data-driven method records on a block's kernels: the nnx.view flag of
# layers.Linear and the Intermediate type it sows.
RECORDS = {"sparsegpt": ("record_gram", layers.InputGram),
           "wanda": ("record_inputs", layers.InputSquares)}


class Pattern(NamedTuple):
    """What to remove: an unstructured `sparsity`, or keep `n` of every `m` inputs."""

    sparsity: float | None
    n: int | None
    m: int | None

    def describe(self) -> str:
        """'50% unstructured' or '2:4'."""
        if self.sparsity is None:
            return f"{self.n}:{self.m}"
        return f"{self.sparsity:.0%} unstructured"


def prune_sequential(
    model: layers.CausalLM,
    batches: Iterable[Mapping[str, Any]],
    method: str,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    where: str | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    progress: bool = False,
) -> tuple[nnx.State, Any]:
    """(pruned params, mask) of a causal LM pruned by `method` block by block (module docstring).

    batches: calibration batches `{"input_ids": int (B, L)}`, optionally with an
    `attention_mask` (all ones if absent); every token counts, so use unpadded windows of text.
    method: "sparsegpt", "wanda" or "magnitude". Give `sparsity` in [0, 1) or both `n` and `m`.
    where: the target kernels (a selector as `pruning.select` takes; default the family's
    PRUNABLE); they must lie inside the decoder's blocks. block_size and dampening: SparseGPT's
    column block and Hessian dampening (a fraction of the mean diagonal). progress: a bar over
    the blocks.
    """
    pattern = _pattern(method, sparsity, n, m)
    if not isinstance(model, layers.CausalLM):
        raise ValueError(
            f"prune_sequential walks the blocks of a causal LM (Llama, OPT); got "
            f"{type(model).__name__}. Prune encoders with pruning.unstructured on their scores."
        )
    params = nnx.state(model, nnx.Param)
    paths = pruning.leaf_paths(params)
    selector = pruning.select(hub.prunable(model) if where is None else where)
    targets = {path for path, leaf in zip(paths, jax.tree.leaves(params), strict=True)
               if selector(path, leaf)}
    blocks = model.backbone.layers
    prefix = f"{model.backbone_name}/layers"
    _check_targets(targets, prefix, len(blocks), where)

    hidden = [] if method == "magnitude" else _embedded(model, batches)
    replaced: dict[str, tuple[jax.Array, jax.Array]] = {}
    for index, block in enumerate(tqdm(blocks, desc=f"{method} {pattern.describe()}",
                                       disable=not progress, unit="block")):
        graphdef, block_params, rest = nnx.split(block, nnx.Param, ...)
        names = [name for name in pruning.leaf_paths(block_params)
                 if f"{prefix}/{index}/{name}" in targets]
        if not names:
            hidden = [_block_outputs(graphdef, block_params, rest, x, mask)
                      for x, mask in hidden]
            continue
        statistics = _recorded(method, graphdef, block_params, rest, hidden)
        kernels = dict(zip(pruning.leaf_paths(block_params), jax.tree.leaves(block_params),
                           strict=True))
        for name in names:
            kernel, keep = _prune_kernel(method, pattern, kernels[name], statistics.get(name),
                                         f"{prefix}/{index}/{name}", block_size, dampening)
            replaced[f"{prefix}/{index}/{name}"] = (kernel, keep)
            kernels[name] = kernel
        if hidden and index + 1 < len(blocks):
            pruned_block = jax.tree.unflatten(jax.tree.structure(block_params),
                                              list(kernels.values()))
            hidden = [_block_outputs(graphdef, pruned_block, rest, x, mask)
                      for x, mask in hidden]
    return _assembled(params, paths, replaced)


def _pattern(method: str, sparsity: float | None, n: int | None, m: int | None) -> Pattern:
    """The checked method and pattern; ValueError naming what is wrong."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    if (sparsity is None) == (n is None and m is None):
        raise ValueError("give either sparsity (unstructured) or n and m (keep n of every m), "
                         f"not both nor neither; got sparsity={sparsity}, n={n}, m={m}")
    if sparsity is not None:
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
        return Pattern(float(sparsity), None, None)
    if n is None or m is None or not 0 < n < m:
        raise ValueError(f"N:M needs 0 < n < m (keep n of every m inputs), got n={n}, m={m}")
    return Pattern(None, int(n), int(m))


def _check_targets(targets: set[str], prefix: str, count: int, where: Any) -> None:
    """Refuses a selection with no kernel, or with leaves outside the decoder's blocks."""
    if not targets:
        raise ValueError(f"the selector {where!r} matches no parameter of the model")
    inside = {f"{prefix}/{i}/" for i in range(count)}
    outside = sorted(t for t in targets
                     if not any(t.startswith(p) for p in inside) or not t.endswith("/" + KERNEL))
    if outside:
        raise ValueError(
            f"prune_sequential prunes the kernels of the decoder's blocks ({prefix}/<i>/...); "
            f"the selector {where!r} also selects {outside[:3]}: narrow it"
        )


def _embedded(model: layers.CausalLM,
              batches: Iterable[Mapping[str, Any]]) -> list[tuple[jax.Array, jax.Array]]:
    """(first block's inputs, attention mask) of every calibration batch."""
    graphdef, state = nnx.split(nnx.view(model.backbone, deterministic=True,
                                         raise_if_not_found=False))
    embedded = []
    for batch in batches:
        if "input_ids" not in batch:
            raise ValueError(f"a calibration batch needs 'input_ids'; got keys {sorted(batch)}")
        ids = jnp.asarray(batch["input_ids"], jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"calibration input_ids must be (batch, length), got {ids.shape}")
        mask = jnp.asarray(batch.get("attention_mask", jnp.ones(ids.shape, jnp.int32)), jnp.int32)
        embedded.append((_embed(graphdef, state, ids, mask), mask))
    if not embedded:
        raise ValueError("SparseGPT and Wanda need at least one calibration batch; got none")
    return embedded


@functools.partial(jax.jit, static_argnames="graphdef")
def _embed(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array,
           mask: jax.Array) -> jax.Array:
    """The backbone's `embed` of one batch."""
    return nnx.merge(graphdef, state).embed(ids, mask)


@functools.partial(jax.jit, static_argnames="graphdef")
def _block_outputs(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State,
                   hidden: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(block outputs, mask): one block applied in eval mode."""
    block = nnx.view(nnx.merge(graphdef, params, rest), deterministic=True,
                     raise_if_not_found=False)
    return block(hidden, mask), mask


@functools.partial(jax.jit, static_argnames=("graphdef", "method"))
def _block_statistics(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State,
                      hidden: jax.Array, mask: jax.Array, method: str) -> dict[str, jax.Array]:
    """{kernel name in the block: the method's input statistic} on one batch."""
    flag, kind = RECORDS[method]
    block = nnx.view(nnx.merge(graphdef, params, rest), deterministic=True,
                     raise_if_not_found=False, **{flag: True})
    _, sums = nnx.capture(lambda b, x, m: b(x, m), kind)(block, hidden, mask)
    names, leaves = pruning.leaf_paths(sums), jax.tree.leaves(sums)
    return {name.rsplit("/", 1)[0] + "/" + KERNEL: leaf
            for name, leaf in zip(names, leaves, strict=True)}


def _recorded(method: str, graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State,
              hidden: list[tuple[jax.Array, jax.Array]]) -> dict[str, jax.Array]:
    """The method's input statistic of every recording kernel of a block, summed over batches
    (empty for magnitude)."""
    if method == "magnitude":
        return {}
    totals: dict[str, jax.Array] = {}
    for x, mask in hidden:
        sums = _block_statistics(graphdef, params, rest, x, mask, method)
        totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
    return totals


def _prune_kernel(method: str, pattern: Pattern, kernel: jax.Array, statistic: jax.Array | None,
                  path: str, block_size: int, dampening: float) -> tuple[jax.Array, jax.Array]:
    """(pruned kernel, kept mask) of one (in, out) kernel; NaN or inf in the kernel or its
    statistic is a ValueError naming the kernel."""
    if kernel.ndim != 2:
        raise ValueError(f"{path} has shape {kernel.shape}; only 2-D (in, out) kernels prune")
    if method == "magnitude":
        check_finite([path], [kernel], weights_message)
        return _selected(kernel, None, pattern)
    statistic = _statistic(statistic, path)
    check_finite([path], [kernel], weights_message)
    check_finite([path], [statistic], norms_message)
    if method == "wanda":
        return _selected(kernel, statistic, pattern)
    try:
        result = pruning.sparsegpt(kernel, statistic, sparsity=pattern.sparsity, n=pattern.n,
                                   m=pattern.m, block_size=block_size, dampening=dampening)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return result.kernel, result.mask


@functools.partial(jax.jit, static_argnames="pattern")
def _selected(kernel: jax.Array, squares: jax.Array | None,
              pattern: Pattern) -> tuple[jax.Array, jax.Array]:
    """(pruned kernel, kept mask) by |w| per kernel, or with `squares` (the inputs' squared
    norms) by Wanda's |W| * ||X|| per output unit; N:M along the inputs with the same scores."""
    scores = jnp.abs(kernel).astype(jnp.float32)
    scope = "layerwise"
    if squares is not None:
        scores = scores * jnp.sqrt(squares)[:, None]
        scope = "per_output"
    if pattern.sparsity is None:
        keep = pruning.n_of_m({"k": scores}, pattern.n, pattern.m, axis=0)["k"]
    else:
        keep = pruning.unstructured({"k": scores}, pattern.sparsity, scope=scope)["k"]
    return jnp.where(keep, kernel, jnp.zeros((), kernel.dtype)), keep


def _statistic(statistic: jax.Array | None, path: str) -> jax.Array:
    """A recorded statistic; ValueError when the kernel's layer was never called."""
    if statistic is None:
        raise ValueError(f"no inputs were recorded for {path}: only kernels of layers.Linear "
                         "modules that the block's forward pass calls can be pruned with data")
    return statistic


def _assembled(params: nnx.State, paths: list[str],
               replaced: Mapping[str, tuple[jax.Array, jax.Array]]) -> tuple[nnx.State, Any]:
    """The params with the replaced kernels, and the mask tree (None off target)."""
    treedef = jax.tree.structure(params)
    leaves = jax.tree.leaves(params)
    pruned = [replaced[p][0] if p in replaced else leaf
              for p, leaf in zip(paths, leaves, strict=True)]
    mask = [replaced[p][1] if p in replaced else None for p in paths]
    return jax.tree.unflatten(treedef, pruned), jax.tree_util.tree_unflatten(treedef, mask)
