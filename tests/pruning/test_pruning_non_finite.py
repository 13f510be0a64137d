"""Non-finite scores: refused eagerly, ranked lowest under jit, refused by checkify if checked."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

from es_jax import pruning

# The module, not `pruning.select` (the leaf selector the package exports under that name).
select = importlib.import_module("es_jax.pruning.select")

SETTINGS = settings(max_examples=20, deadline=None)
SHAPES = {"a": (8, 16), "b": (12, 8)}
NON_FINITE = (np.nan, np.inf, -np.inf)


def finite_tree(seed: int = 0, tied: bool = False) -> dict[str, jax.Array]:
    """Two float32 matrices of SHAPES: normal values, or with `tied` a handful of integers."""
    rng = np.random.default_rng(seed)
    draw = (lambda s: rng.integers(-3, 4, s)) if tied else (lambda s: rng.normal(size=s))
    return {name: jnp.asarray(draw(shape), jnp.float32) for name, shape in SHAPES.items()}


@st.composite
def trees_with_non_finite(draw: st.DrawFn) -> dict[str, jax.Array]:
    """A tree of SHAPES with NaN, +inf and -inf at a few random positions (many ties besides)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    tree = {}
    for name, shape in SHAPES.items():
        values = rng.integers(-3, 4, shape).astype(np.float32)
        spots = rng.random(shape) < draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
        values[spots] = rng.choice(NON_FINITE, int(spots.sum()))
        tree[name] = jnp.asarray(values)
    return tree


def ranked(values: np.ndarray) -> np.ndarray:
    """The documented ranking: every non-finite score below every finite one, tied together."""
    return np.where(np.isfinite(values), values, -np.inf)


def removed_reference(tree: dict, sparsity: float) -> np.ndarray:
    """Flags of the round(s * n) lowest ranked scores, ties by leaf order then flat index."""
    flat = np.concatenate([np.asarray(leaf, np.float32).ravel() for leaf in tree.values()])
    keys = ranked(flat)
    removed = np.zeros(flat.size, bool)
    removed[np.lexsort((np.arange(flat.size), keys))[:round(sparsity * flat.size)]] = True
    return removed


def removed_flags(mask: dict) -> np.ndarray:
    """Pruned flags of a mask, concatenated in leaf order."""
    return np.concatenate([~np.asarray(leaf).ravel() for leaf in mask.values()])


# Eager calls refuse non-finite values, naming the leaf.

@pytest.mark.parametrize("bad", NON_FINITE)
def test_unstructured_refuses_non_finite_scores(bad):
    scores = finite_tree()
    scores["b"] = scores["b"].at[3, 1].set(bad)
    with pytest.raises(ValueError, match=r"leaf 'b' contains NaN or inf scores"):
        pruning.unstructured(scores, 0.5)
    with pytest.raises(ValueError, match=r"leaf 'b' contains NaN or inf scores"):
        pruning.unstructured(scores, [0.2, 0.5], scope="layerwise")


def test_unstructured_refuses_scores_that_the_transform_makes_non_finite():
    scores = finite_tree()
    with pytest.raises(ValueError, match=r"leaf 'a' contains NaN or inf scores"):
        pruning.unstructured(scores, 0.5, transform=lambda x: jnp.log(x))


@pytest.mark.parametrize("bad", NON_FINITE)
def test_n_of_m_refuses_non_finite_scores(bad):
    scores = finite_tree()
    scores["a"] = scores["a"].at[0, 0].set(bad)
    with pytest.raises(ValueError, match=r"leaf 'a' contains NaN or inf scores"):
        pruning.n_of_m(scores, n=2, m=4)


@pytest.mark.parametrize("bad", NON_FINITE)
def test_wanda_refuses_non_finite_input_norms(bad):
    params = finite_tree()
    norms = {"a": jnp.ones(8).at[5].set(bad), "b": jnp.ones(12)}
    with pytest.raises(ValueError, match=r"input norms for leaf 'a' contain NaN or inf"):
        pruning.wanda(params, norms)


def test_wanda_ignores_norms_of_leaves_that_are_not_targets():
    params = finite_tree()
    norms = {"a": jnp.ones(8), "b": jnp.full(12, np.nan)}
    scores = pruning.wanda(params, norms, where="a")
    assert scores["b"] is None


# Under jit, where values are unknown: non-finite scores rank below every finite score.

@SETTINGS
@given(tree=trees_with_non_finite(),
       levels=st.lists(st.floats(0, 1), min_size=1, max_size=3).map(sorted))
def test_jitted_unstructured_removes_non_finite_scores_first(tree, levels):
    masks = jax.jit(lambda t: pruning.unstructured(t, levels))(tree)
    for level, mask in zip(levels, masks, strict=True):
        np.testing.assert_array_equal(removed_flags(mask), removed_reference(tree, level))


@SETTINGS
@given(tree=trees_with_non_finite(), sparsity=st.floats(0, 1))
def test_jitted_omp_removes_non_finite_weights_first(tree, sparsity):
    pruned, mask = jax.jit(lambda t: pruning.omp(t, sparsity))(tree)
    magnitudes = {name: np.abs(np.asarray(leaf)) for name, leaf in tree.items()}
    np.testing.assert_array_equal(removed_flags(mask), removed_reference(magnitudes, sparsity))
    non_finite = sum(int((~np.isfinite(m)).sum()) for m in magnitudes.values())
    if round(sparsity * 224) >= non_finite:  # 224 weights: every non-finite one is removed
        for name in tree:
            assert np.isfinite(np.asarray(pruned[name])).all()


@SETTINGS
@given(tree=trees_with_non_finite(), sparsity=st.floats(0, 1))
def test_jitted_layerwise_removes_non_finite_scores_first_in_each_leaf(tree, sparsity):
    mask = jax.jit(lambda t: pruning.unstructured(t, sparsity, scope="layerwise"))(tree)
    for name, leaf in tree.items():
        np.testing.assert_array_equal(removed_flags({name: mask[name]}),
                                      removed_reference({name: leaf}, sparsity))


@SETTINGS
@given(tree=trees_with_non_finite(), n=st.integers(0, 4))
def test_jitted_n_of_m_keeps_finite_scores_before_non_finite_ones(tree, n):
    mask = jax.jit(lambda t: pruning.n_of_m(t, n=n, m=4))(tree)
    for name, leaf in tree.items():
        keys = ranked(np.asarray(leaf))
        groups = keys.reshape(keys.shape[0] // 4, 4, keys.shape[1])
        # Keep the n largest of each group; among equal keys, the lower index first.
        order = np.argsort(-groups, axis=1, kind="stable")
        expected = np.zeros(groups.shape, bool)
        np.put_along_axis(expected, order[:, :n], True, axis=1)
        np.testing.assert_array_equal(np.asarray(mask[name]), expected.reshape(keys.shape))


def test_jitted_wanda_with_nan_norms_prunes_the_nan_scores_first():
    params = finite_tree()
    norms = {"a": jnp.ones(8).at[:6].set(np.nan), "b": jnp.ones(12)}  # 96 of 224 scores NaN

    def prune(p: dict, input_norms: dict) -> dict:
        return pruning.unstructured(pruning.wanda(p, input_norms), 0.9)

    mask = jax.jit(prune)(params, norms)
    assert not np.asarray(mask["a"])[:6].any()
    assert int(np.asarray(mask["a"]).sum() + np.asarray(mask["b"]).sum()) == 224 - round(0.9 * 224)


def test_every_non_finite_score_sorts_below_the_smallest_finite_one():
    values = jnp.asarray([np.nan, -np.nan, np.inf, -np.inf, -np.finfo(np.float32).max,
                          -1.0, -0.0, 0.0, 1e-45, np.finfo(np.float32).max], jnp.float32)
    keys = np.asarray(jax.jit(select.sortable_keys)(values)).astype(np.int64)
    assert (keys[:4] == keys[0]).all()
    assert (keys[:4] < keys[4:].min()).all()
    assert (np.diff(keys[4:]) >= 0).all()
    assert keys[6] == keys[7]


# checked=True: the same refusal inside jit, through jax.experimental.checkify.

def with_nan(tree: dict, name: str) -> dict:
    """The tree with a NaN at [1, 2] of leaf `name`."""
    return {**tree, name: tree[name].at[1, 2].set(np.nan)}


@pytest.mark.parametrize("prune", [
    lambda t: pruning.unstructured(t, [0.3, 0.6], checked=True),
    lambda t: pruning.unstructured(t, 0.5, scope="layerwise", checked=True),
    lambda t: pruning.unstructured(t, 0.5, transform=jnp.abs, checked=True),
    lambda t: pruning.n_of_m(t, 2, 4, checked=True),
    lambda t: pruning.omp(t, 0.5, checked=True),
])
def test_checked_selection_raises_under_checkify_and_jit(prune):
    checked = jax.jit(checkify.checkify(prune))
    error, _ = checked(with_nan(finite_tree(), "b"))
    with pytest.raises(checkify.JaxRuntimeError, match=r"leaf 'b' contains NaN or inf"):
        error.throw()
    error, out = checked(finite_tree())
    assert error.get() is None
    jax.tree.map(np.testing.assert_array_equal, out, prune(finite_tree()))


def test_checked_selection_without_checkify_is_an_error_under_jit():
    with pytest.raises(ValueError, match="checkify"):
        jax.jit(lambda t: pruning.unstructured(t, 0.5, checked=True))(finite_tree())


def test_checked_selection_refuses_eagerly_with_a_value_error():
    with pytest.raises(ValueError, match=r"leaf 'a' contains NaN or inf scores"):
        pruning.unstructured(with_nan(finite_tree(), "a"), 0.5, checked=True)
