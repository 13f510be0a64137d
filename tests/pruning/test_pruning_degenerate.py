"""Degenerate but valid input: zero-size leaves, array sparsities, ERK at high sparsity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from es_jax import pruning

SETTINGS = settings(max_examples=40, deadline=None)


def tree_with_empty_leaf() -> dict[str, jax.Array]:
    """Two kernels with an empty one between them, in leaf order: a, empty, z."""
    rng = np.random.default_rng(0)
    return {"a": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
            "empty": jnp.zeros((0, 4), jnp.float32),
            "z": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)}


def without_empty(tree: dict) -> dict:
    """The tree without its empty leaf."""
    return {name: leaf for name, leaf in tree.items() if name != "empty"}


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("jit", [False, True])
def test_a_zero_size_leaf_gets_an_empty_mask(scope, jit):
    tree = tree_with_empty_leaf()
    levels = [0.3, 0.7]

    def prune(t: dict) -> list:
        return pruning.unstructured(t, levels, scope=scope, transform=jnp.abs)

    masks = (jax.jit(prune) if jit else prune)(tree)
    for mask, expected in zip(masks, prune(without_empty(tree)), strict=True):
        assert mask["empty"].shape == (0, 4)
        assert mask["empty"].dtype == jnp.bool_
        jax.tree.map(np.testing.assert_array_equal, without_empty(mask), expected)


def test_omp_with_a_zero_size_leaf():
    tree = tree_with_empty_leaf()
    pruned, mask = pruning.omp(tree, 0.5)
    assert pruned["empty"].shape == (0, 4)
    assert mask["empty"].shape == (0, 4)
    assert sum(int((~np.asarray(m)).sum()) for m in mask.values()) == round(0.5 * 56)


def test_only_zero_size_leaves():
    mask = pruning.unstructured({"w": jnp.zeros((0, 3))}, [0.0, 1.0])
    assert [m["w"].shape for m in mask] == [(0, 3), (0, 3)]


@pytest.mark.parametrize(("shape", "axis"), [((0, 4), 0), ((0, 4), 1), ((4, 0), 0)])
def test_n_of_m_on_a_zero_size_leaf(shape, axis):
    mask = pruning.n_of_m({"w": jnp.zeros(shape)}, n=2, m=4, axis=axis)
    assert mask["w"].shape == shape
    assert mask["w"].dtype == jnp.bool_


def test_erk_with_a_zero_size_leaf():
    tree = tree_with_empty_leaf()
    mask = pruning.erk(tree, 0.5, jax.random.PRNGKey(0))
    assert mask["empty"].shape == (0, 4)
    assert sum(int(np.asarray(m).sum()) for m in mask.values()) == 56 - round(0.5 * 56)


@pytest.mark.parametrize("sparsity", [np.float32(0.25), np.asarray(0.25), jnp.asarray(0.25),
                                      jnp.asarray(0.25, jnp.bfloat16)])
def test_a_zero_dimensional_array_sparsity_works_like_a_float(sparsity):
    tree = without_empty(tree_with_empty_leaf())
    expected = pruning.unstructured(tree, 0.25)
    jax.tree.map(np.testing.assert_array_equal, pruning.unstructured(tree, sparsity), expected)
    jax.tree.map(np.testing.assert_array_equal,
                 jax.jit(lambda t: pruning.unstructured(t, sparsity))(tree), expected)
    assert len(pruning.unstructured(tree, jnp.asarray([sparsity, 0.5]))) == 2


# ERK: densities proportional to sum(dims) / prod(dims), capped at 1, at least one weight a leaf.

def erk_reference(shapes: list[tuple[int, ...]], sparsity: float) -> np.ndarray:
    """Real kept counts clip(c * sum(dims), 1, size) (0 for empty leaves) summing to the kept
    budget: c found exactly on the piecewise-linear total between its breakpoints."""
    sizes = np.array([np.prod(s) for s in shapes], np.float64)
    weights = np.array([np.sum(s) for s in shapes], np.float64)
    low = np.minimum(sizes, 1.0)
    budget = sizes.sum() - round(sparsity * sizes.sum())

    def total(c: float) -> float:
        return float(np.clip(c * weights, low, sizes).sum())

    live = weights > 0
    points = np.unique(np.concatenate([[0.0], low[live] / weights[live],
                                       sizes[live] / weights[live]]))
    totals = np.array([total(c) for c in points])
    # The last total (every leaf full) can round below the budget it equals.
    right = min(int(np.searchsorted(totals, budget)), len(totals) - 1)
    if right == 0 or totals[right] == budget:
        return np.clip(points[right] * weights, low, sizes)
    c0, c1 = points[right - 1], points[right]
    c = c0 + (budget - totals[right - 1]) * (c1 - c0) / (totals[right] - totals[right - 1])
    return np.clip(c * weights, low, sizes)


shapes_strategy = st.lists(st.one_of(st.tuples(st.integers(1, 40), st.integers(1, 40)),
                                     st.tuples(st.integers(0, 5), st.integers(1, 8)),
                                     st.tuples(st.integers(1, 30))), min_size=1, max_size=5)


@SETTINGS
@given(shapes=shapes_strategy, sparsity=st.floats(0, 1))
def test_erk_keeps_the_exact_budget_within_one_weight_of_each_leafs_share(shapes, sparsity):
    sizes = np.array([np.prod(s) for s in shapes], np.int64)
    budget = int(sizes.sum() - round(sparsity * sizes.sum()))
    leaves = int((sizes > 0).sum())
    if 0 < budget < leaves:
        with pytest.raises(ValueError, match="target leaves"):
            pruning.erk_kept_counts(shapes, sparsity)
        return
    kept = np.asarray(pruning.erk_kept_counts(shapes, sparsity))
    np.testing.assert_allclose(pruning.erk_densities(shapes, sparsity),
                               np.where(sizes > 0, kept / np.maximum(sizes, 1), 1.0))
    assert kept.sum() == budget
    assert np.all(kept <= sizes)
    if budget:
        assert np.all(kept[sizes > 0] >= 1)
        assert np.all(np.abs(kept - erk_reference(shapes, sparsity)) < 1 + 1e-9)
    else:
        assert np.all(kept == 0)


def test_erk_keeps_a_weight_in_a_leaf_its_share_would_empty():
    # At 0.99 the 2x2 leaf's share is 0.3 of a weight: it keeps one, the others share the rest.
    tree = {**{f"l{i}": jnp.ones((16, 16)) for i in range(4)}, "tiny": jnp.ones((2, 2))}
    mask = pruning.erk(tree, 0.99, jax.random.PRNGKey(0))
    kept = {name: int(np.asarray(m).sum()) for name, m in mask.items()}
    assert kept["tiny"] == 1
    assert sum(kept.values()) == 1028 - round(0.99 * 1028)


def test_erk_caps_dense_leaves_and_redistributes_their_share():
    # At 0.2 the 2x2 leaf's share is more than its 4 weights: it is dense and the rest go to
    # the 64x64 leaf.
    densities = pruning.erk_densities([(64, 64), (2, 2)], 0.2)
    assert densities[1] == 1.0
    assert round(densities[0] * 4096) + 4 == 4100 - round(0.2 * 4100)


def test_erk_at_sparsity_one_removes_everything():
    mask = pruning.erk({"a": jnp.ones((4, 4)), "b": jnp.ones((2, 8))}, 1.0, jax.random.PRNGKey(0))
    assert not any(np.asarray(m).any() for m in mask.values())
