"""Nested masks as one uint8 array per leaf: `pruning.levels` and `pruning.mask_at`, checked
against `pruning.unstructured` and a numpy reference of the first level that prunes each weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

from es_jax import pruning

SETTINGS = settings(max_examples=12, deadline=None)
SCOPES = ("global", "layerwise", "per_output")
# One fixed layout and three levels, so each scope compiles once for the whole file.
SHAPES = {"a": (8, 6), "c": (4, 3, 5)}
NON_FINITE = (np.nan, np.inf, -np.inf)


def make_tree(values: dict[str, np.ndarray]) -> dict:
    """A scores tree of the arrays `values` (float32), with a non-target leaf 'b' (None)."""
    return {"a": jnp.asarray(values["a"], jnp.float32), "b": None,
            "c": jnp.asarray(values["c"], jnp.float32)}


@st.composite
def score_trees(draw: st.DrawFn, non_finite: bool = False) -> dict:
    """Trees of SHAPES: normal values, or small integers (many ties); with `non_finite`, NaN and
    +-inf at random positions."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    tied = draw(st.booleans())
    values = {}
    for name, shape in SHAPES.items():
        leaf = (rng.integers(-2, 3, shape) if tied else rng.normal(size=shape)).astype(np.float32)
        if non_finite:
            spots = rng.random(shape) < draw(st.sampled_from([0.1, 0.5, 1.0]))
            leaf[spots] = rng.choice(NON_FINITE, int(spots.sum()))
        values[name] = leaf
    return make_tree(values)


# Three strictly increasing levels in thousandths: 0 and 1 come up, and so do distinct
# sparsities that round to the same count.
INCREASING = st.lists(st.integers(0, 1000), min_size=3, max_size=3, unique=True).map(
    lambda v: [x / 1000 for x in sorted(v)])


def ranks(values: np.ndarray) -> np.ndarray:
    """Each score's position in removal order: non-finite first, then ascending, ties by flat
    index."""
    keys = np.where(np.isfinite(values), values, -np.inf)
    order = np.lexsort((np.arange(values.size), keys))
    rank = np.empty(values.size, np.int64)
    rank[order] = np.arange(values.size)
    return rank


def first_pruned(rank: np.ndarray, size: int, sparsities: list[float]) -> np.ndarray:
    """The first level removing each rank: level l removes the round(s_l * size) lowest ranks;
    len(sparsities) where none does."""
    return sum((rank >= round(s * size)).astype(np.int64) for s in sparsities)


def reference_levels(tree: dict, sparsities: list[float], scope: str) -> dict[str, np.ndarray]:
    """Levels of the target leaves by the numpy reference (leaf order, then flat index)."""
    leaves = {name: np.asarray(tree[name], np.float32) for name in SHAPES}
    if scope == "global":
        flat = np.concatenate([leaf.ravel() for leaf in leaves.values()])
        level = first_pruned(ranks(flat), flat.size, sparsities)
        splits = np.cumsum([leaf.size for leaf in leaves.values()])[:-1]
        return {name: part.reshape(leaf.shape) for (name, leaf), part in
                zip(leaves.items(), np.split(level, splits), strict=True)}
    if scope == "layerwise":
        return {name: first_pruned(ranks(leaf.ravel()), leaf.size, sparsities).reshape(leaf.shape)
                for name, leaf in leaves.items()}
    out = {}
    for name, leaf in leaves.items():
        level = np.zeros(leaf.shape, np.int64)
        for j in range(leaf.shape[-1]):
            column = leaf[..., j].ravel()
            level[..., j] = first_pruned(ranks(column), column.size, sparsities).reshape(
                leaf.shape[:-1])
        out[name] = level
    return out


def assert_levels(lv: dict, tree: dict, sparsities: list[float], scope: str) -> None:
    """lv is uint8 in [0, L], None off target, and equals the numpy reference."""
    assert lv["b"] is None
    for name, expected in reference_levels(tree, sparsities, scope).items():
        got = np.asarray(lv[name])
        assert got.dtype == np.uint8
        assert got.shape == SHAPES[name]
        assert got.max() <= len(sparsities)  # and >= 0: unsigned
        np.testing.assert_array_equal(got, expected)


def assert_masks_equal(got: dict, expected: dict) -> None:
    """Two mask trees are identical: same None leaves, same bool arrays."""
    assert got["b"] is None
    assert expected["b"] is None
    for name in SHAPES:
        assert np.asarray(got[name]).dtype == np.bool_
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(expected[name]))


@SETTINGS
@given(tree=score_trees(), sparsities=INCREASING, scope=st.sampled_from(SCOPES))
def test_levels_match_the_reference_and_every_mask_of_unstructured(tree, sparsities, scope):
    lv = pruning.levels(tree, sparsities, scope=scope)
    assert_levels(lv, tree, sparsities, scope)
    masks = pruning.unstructured(tree, sparsities, scope=scope)
    for i, mask in enumerate(masks):
        assert_masks_equal(pruning.mask_at(lv, i), mask)


# Jitted once per scope: the sparsities fix the program, so they are static (and fixed here).
JIT_SPARSITIES = (0.0, 0.4, 0.9)
jit_levels = jax.jit(pruning.levels, static_argnames=("sparsities", "scope"))
jit_unstructured = jax.jit(pruning.unstructured, static_argnames=("sparsity", "scope"))
jit_mask_at = jax.jit(pruning.mask_at, static_argnums=1)


@SETTINGS
@given(tree=score_trees(non_finite=True), scope=st.sampled_from(SCOPES))
def test_jitted_levels_remove_non_finite_scores_first_as_unstructured_does(tree, scope):
    lv = jit_levels(tree, sparsities=JIT_SPARSITIES, scope=scope)
    assert_levels(lv, tree, list(JIT_SPARSITIES), scope)
    masks = jit_unstructured(tree, sparsity=JIT_SPARSITIES, scope=scope)
    for i, mask in enumerate(masks):
        assert_masks_equal(jit_mask_at(lv, i), mask)


def test_transform_abs_equals_stored_magnitudes_and_jit_equals_eager():
    rng = np.random.default_rng(5)
    signed = make_tree({name: rng.integers(-3, 4, shape) for name, shape in SHAPES.items()})
    magnitudes = {**signed, "a": jnp.abs(signed["a"]), "c": jnp.abs(signed["c"])}
    sparsities = [0.2, 0.5, 0.875]
    for scope in SCOPES:
        stored = pruning.levels(magnitudes, sparsities, scope=scope)
        computed = pruning.levels(signed, sparsities, scope=scope, transform=jnp.abs)
        for name in SHAPES:
            np.testing.assert_array_equal(np.asarray(computed[name]), np.asarray(stored[name]))
        assert_levels(stored, magnitudes, sparsities, scope)
    jitted = jax.jit(lambda t: pruning.levels(t, sparsities, transform=jnp.abs))(signed)
    eager = pruning.levels(signed, sparsities, transform=jnp.abs)
    for name in SHAPES:
        np.testing.assert_array_equal(np.asarray(jitted[name]), np.asarray(eager[name]))


def test_hand_computed_levels_with_ties():
    # Removal order: -1 (flat index 3), the tied 0s by index (0, 2), 2 (1), 3 (5), 5 (4). The
    # levels remove round(0.6) = 1, round(3.0) = 3 and round(4.2) = 4 of the 6 weights.
    lv = pruning.levels({"w": jnp.asarray([[0.0, 2.0, 0.0], [-1.0, 5.0, 3.0]])}, [0.1, 0.5, 0.7])
    np.testing.assert_array_equal(np.asarray(lv["w"]), [[1, 2, 1], [0, 3, 3]])
    np.testing.assert_array_equal(np.asarray(pruning.mask_at(lv, 1)["w"]),
                                  [[False, True, False], [False, True, True]])


def test_the_most_levels_fit_one_byte():
    rng = np.random.default_rng(1)
    tree = {"a": jnp.asarray(rng.normal(size=(300, 2)), jnp.float32)}
    sparsities = [i / 256 for i in range(255)]  # per output: 300 inputs, so every level differs
    lv = np.asarray(pruning.levels(tree, sparsities, scope="per_output")["a"])
    assert lv.dtype == np.uint8
    assert lv.max() == 255
    for j in range(2):
        np.testing.assert_array_equal(lv[:, j], first_pruned(ranks(np.asarray(tree["a"])[:, j]),
                                                             300, sparsities))


def test_eager_levels_refuse_non_finite_scores_and_checked_refuses_under_checkify():
    rng = np.random.default_rng(2)
    tree = make_tree({name: rng.normal(size=shape) for name, shape in SHAPES.items()})
    bad = {**tree, "c": tree["c"].at[1, 2, 3].set(np.nan)}
    with pytest.raises(ValueError, match=r"leaf 'c' contains NaN or inf scores"):
        pruning.levels(bad, [0.2, 0.5, 0.8])
    checked = jax.jit(checkify.checkify(lambda t: pruning.levels(t, [0.2, 0.5, 0.8],
                                                                 checked=True)))
    error, _ = checked(bad)
    with pytest.raises(checkify.JaxRuntimeError, match=r"leaf 'c' contains NaN or inf"):
        error.throw()
    error, lv = checked(tree)
    assert error.get() is None
    assert_levels(lv, tree, [0.2, 0.5, 0.8], "global")


@pytest.mark.parametrize(("sparsities", "message"), [
    ([0.5, 0.5], r"strictly increasing, but level 1 \(0.5\) does not exceed level 0 \(0.5\)"),
    ([0.1, 0.6, 0.3], r"strictly increasing, but level 2 \(0.3\) does not exceed level 1"),
    ([i / 300 for i in range(256)], r"256 sparsity levels, but a uint8 levels array holds at "
                                     r"most 255"),
    ([], "no sparsity level given"),
    ([0.2, 1.5], r"sparsity 1.5 is outside \[0, 1\]"),
])
def test_levels_refuse_bad_sparsities_in_one_line(sparsities, message):
    with pytest.raises(ValueError, match=message) as raised:
        pruning.levels({"w": jnp.ones((4, 4))}, sparsities)
    assert "\n" not in str(raised.value)


def test_levels_refuse_a_bad_scope_and_a_per_output_leaf_without_inputs():
    with pytest.raises(ValueError, match="scope must be one of"):
        pruning.levels({"w": jnp.ones((4, 4))}, [0.5], scope="rows")
    with pytest.raises(ValueError, match=r"leaf 'bias' of shape \(4,\) has no input axis"):
        pruning.levels({"bias": jnp.ones(4)}, [0.5], scope="per_output")


@pytest.mark.parametrize(("i", "message"), [
    (-1, "level index -1 is out of range"),
    (255, "level index 255 is out of range"),
    (1.0, "level index is a concrete integer"),
    (True, "level index is a concrete integer"),
])
def test_mask_at_refuses_an_index_out_of_range_in_one_line(i, message):
    lv = pruning.levels({"w": jnp.arange(4.0).reshape(2, 2)}, [0.25, 0.75])
    with pytest.raises(ValueError, match=message) as raised:
        pruning.mask_at(lv, i)
    assert "\n" not in str(raised.value)


def test_mask_at_refuses_a_tree_that_is_not_levels_naming_the_leaf():
    mask = pruning.unstructured({"w": jnp.arange(4.0).reshape(2, 2)}, 0.5)
    with pytest.raises(ValueError, match=r"levels tree at 'w' has dtype bool, not uint8"):
        pruning.mask_at(mask, 0)
