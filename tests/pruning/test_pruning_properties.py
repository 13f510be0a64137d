"""Properties of the pruning transforms, checked with hypothesis against a numpy reference."""

import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from es_jax import pruning

# The module, not `pruning.select` (the leaf selector the package exports under that name).
select = importlib.import_module("es_jax.pruning.select")

SETTINGS = settings(max_examples=20, deadline=None)


LAYOUTS = ([(8, 16), (12, 8)], [(8, 16), (12, 8), (4, 16)])


@st.composite
def weight_trees(draw: st.DrawFn, tied: bool = False) -> dict[str, jax.Array]:
    """Two or three small matrices of fixed layouts (so each compiles once); with `tied`, drawn
    from a handful of values (many ties)."""
    shapes = draw(st.sampled_from(LAYOUTS))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    tree = {}
    for i, shape in enumerate(shapes):
        values = rng.integers(-3, 4, shape) if tied else rng.normal(size=shape)
        tree[f"layer{i}"] = {"kernel": jnp.asarray(values, jnp.float32),
                             "bias": jnp.asarray(rng.normal(size=shape[1]), jnp.float32)}
    return tree


def pruned_flags(mask: dict) -> np.ndarray:
    """Pruned flags of the kernels, concatenated in leaf order."""
    return np.concatenate([~np.asarray(m).ravel() for m in jax.tree.leaves(mask)])


def kernel_scores(tree: dict) -> np.ndarray:
    """|w| of the kernels, concatenated in leaf order (the reference order of ties)."""
    return np.concatenate([np.abs(np.asarray(layer["kernel"])).ravel()
                           for layer in tree.values()])


@SETTINGS
@given(tree=weight_trees(tied=True), sparsity=st.floats(0, 1))
def test_global_removes_exactly_round_s_n_in_key_then_index_order(tree, sparsity):
    mask = pruning.unstructured(pruning.magnitude(tree, where=r".*kernel"), sparsity)
    scores = kernel_scores(tree)
    k = round(sparsity * scores.size)
    expected = np.zeros(scores.size, bool)
    expected[np.lexsort((np.arange(scores.size), scores))[:k]] = True
    np.testing.assert_array_equal(pruned_flags(mask), expected)


@SETTINGS
@given(tree=weight_trees(tied=True),
       levels=st.lists(st.floats(0, 1), min_size=3, max_size=3).map(sorted))
def test_masks_nest_across_sparsities(tree, levels):
    masks = pruning.unstructured(pruning.magnitude(tree, where=r".*kernel"), levels)
    flags = [pruned_flags(m) for m in masks]
    for lower, higher in itertools.pairwise(flags):
        assert np.all(higher[lower]), "a weight pruned at lower sparsity came back"


@SETTINGS
@given(tree=weight_trees(), n=st.integers(0, 4))
def test_every_n_of_m_group_keeps_exactly_n(tree, n):
    mask = pruning.n_of_m(pruning.magnitude(tree, where=r".*kernel"), n=n, m=4)
    for layer, layer_mask in zip(tree.values(), mask.values(), strict=True):
        kept = np.asarray(layer_mask["kernel"])
        groups = kept.reshape(kept.shape[0] // 4, 4, kept.shape[1])
        np.testing.assert_array_equal(groups.sum(axis=1), n)
        scores = np.abs(np.asarray(layer["kernel"])).reshape(groups.shape)
        if 0 < n < 4:
            smallest_kept = np.where(groups, scores, np.inf).min(axis=1)
            largest_pruned = np.where(groups, -np.inf, scores).max(axis=1)
            assert np.all(smallest_kept >= largest_pruned)


@SETTINGS
@given(tree=weight_trees(), sparsity=st.floats(0, 1))
def test_apply_is_idempotent_and_leaves_non_targets(tree, sparsity):
    pruned, mask = pruning.omp(tree, sparsity, where=r".*kernel")
    again = pruning.apply(pruned, mask)
    jax.tree.map(np.testing.assert_array_equal, again, pruned)
    for name in tree:
        np.testing.assert_array_equal(pruned[name]["bias"], tree[name]["bias"])
        assert mask[name]["bias"] is None


@SETTINGS
@given(tree=weight_trees(tied=True), sparsity=st.floats(0, 1),
       scope=st.sampled_from(["global", "layerwise"]))
def test_omp_equals_unstructured_on_stored_magnitudes(tree, sparsity, scope):
    # omp computes |w| inside the selection; the masks must be those of the stored |w|.
    _, mask = pruning.omp(tree, sparsity, where=r".*kernel", scope=scope)
    stored = pruning.unstructured(pruning.magnitude(tree, where=r".*kernel"), sparsity, scope=scope)
    np.testing.assert_array_equal(pruned_flags(mask), pruned_flags(stored))


@SETTINGS
@given(tree=weight_trees(), sparsity=st.floats(0, 1))
def test_layerwise_prunes_the_same_fraction_of_every_leaf(tree, sparsity):
    mask = pruning.unstructured(pruning.magnitude(tree, where=r".*kernel"), sparsity,
                                scope="layerwise")
    for name, layer in tree.items():
        size = layer["kernel"].size
        assert int((~np.asarray(mask[name]["kernel"])).sum()) == round(sparsity * size)


def fixed_tree(tied: bool) -> dict[str, jax.Array]:
    """A fixed tree of two kernels and their biases."""
    rng = np.random.default_rng(7)
    draw = (lambda s: rng.integers(-3, 4, s)) if tied else rng.normal
    return {f"layer{i}": {"kernel": jnp.asarray(draw((8, 16)), jnp.float32),
                          "bias": jnp.zeros(16)} for i in range(2)}


def test_nested_levels_equal_separate_calls():
    tree = fixed_tree(tied=True)
    scores = pruning.magnitude(tree, where=r".*kernel")
    levels = [0.1, 0.35, 0.8]
    together = pruning.unstructured(scores, levels)
    for level, mask in zip(levels, together, strict=True):
        np.testing.assert_array_equal(pruned_flags(mask),
                                      pruned_flags(pruning.unstructured(scores, level)))


def test_masks_are_identical_under_jit():
    tree = fixed_tree(tied=True)
    eager = pruning.omp(tree, [0.3, 0.6], where=r".*kernel")
    jitted = jax.jit(lambda t: pruning.omp(t, [0.3, 0.6], where=r".*kernel"))(tree)
    jax.tree.map(np.testing.assert_array_equal, jitted, eager)


def test_low_precision_leaves_prune_exactly():
    rng = np.random.default_rng(0)
    for dtype in (jnp.bfloat16, jnp.float16):
        tree = {"a": jnp.asarray(rng.normal(size=(32, 16)), dtype),
                "b": jnp.asarray(rng.normal(size=(16, 8)), dtype)}
        pruned, mask = pruning.omp(tree, 0.4)
        assert pruned["a"].dtype == dtype
        removed = sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(mask))
        assert removed == round(0.4 * (32 * 16 + 16 * 8))
        kept_min = min(float(jnp.where(m, jnp.abs(w), jnp.inf).min()) for m, w in
                       zip(jax.tree.leaves(mask), jax.tree.leaves(tree), strict=True))
        pruned_max = max(float(jnp.where(m, -jnp.inf, jnp.abs(w)).max()) for m, w in
                         zip(jax.tree.leaves(mask), jax.tree.leaves(tree), strict=True))
        assert kept_min >= pruned_max


def test_arrays_of_one_size_but_different_dtypes_prune_exactly():
    rng = np.random.default_rng(3)
    tree = {"a": jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16),
            "b": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
            "c": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}
    scores = np.concatenate([np.abs(np.asarray(tree[k], np.float32)).ravel() for k in "abc"])
    for sparsity in (0.25, 0.6):
        mask = pruning.unstructured(pruning.magnitude(tree), sparsity)
        k = round(sparsity * scores.size)
        expected = np.zeros(scores.size, bool)
        expected[np.lexsort((np.arange(scores.size), scores))[:k]] = True
        got = np.concatenate([~np.asarray(mask[name]).ravel() for name in "abc"])
        np.testing.assert_array_equal(got, expected)


def removed_in_order(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Reference: flags of the round(s * n) lowest scores, ties broken by flat position."""
    removed = np.zeros(scores.size, bool)
    removed[np.lexsort((np.arange(scores.size), scores))[:round(sparsity * scores.size)]] = True
    return removed


def test_sample_miss_falls_back_to_a_coarse_pass_over_all_keys():
    # The weights the sample reads are tiny, the rest are not: the sample puts every k-th key
    # among the tiny ones, so the coarse pass over its range misses them.
    size = 4 * select.SAMPLE_SIZE
    positions = jnp.arange(1, size + 1, dtype=jnp.float32)  # exact in float32 below 2**24
    keys = select._sample(select.Leaves([positions]), select.SAMPLE_SIZE)
    # A positive score's key is its bit pattern with the top bit set.
    sampled = np.asarray(jax.lax.bitcast_convert_type(keys & 0x7FFFFFFF, jnp.float32))
    rng = np.random.default_rng(1)
    weights = rng.uniform(1.0, 2.0, size).astype(np.float32)
    weights[sampled.astype(np.int64) - 1] = rng.uniform(1e-6, 2e-6, sampled.size)
    tree = {"w": jnp.asarray(weights).reshape(512, -1)}
    sparsities = (0.3, 0.5, 0.9)

    leaves = select.Leaves([tree["w"]], jnp.abs)
    ks = jnp.asarray([round(s * size) for s in sparsities], jnp.uint32)
    lo, shift = select._sampled_range(select._sample(leaves, select.SAMPLE_SIZE), size, ks)
    hist = select._coarse_histogram(leaves, lo, shift, jnp.uint32)
    bins, _ = jax.vmap(select._kth_bin, in_axes=(None, 0))(hist, ks)
    assert np.any(np.asarray(bins - select.SPREAD) >= select.COARSE_BLOCKS)  # it really misses

    masks = pruning.unstructured(pruning.magnitude(tree, where="w"), list(sparsities))
    for sparsity, mask in zip(sparsities, masks, strict=True):
        np.testing.assert_array_equal(~np.asarray(mask["w"]).ravel(),
                                      removed_in_order(weights, sparsity))


def test_ties_counted_per_key_when_the_range_is_too_wide_to_count_per_leaf():
    # Signed scores span both halves of the key space: too wide a range for per-leaf counts of
    # 40 leaves at 10 levels, so the fine pass counts per key and one more pass finds the ties.
    rng = np.random.default_rng(2)
    scores = {f"w{i:02d}": jnp.asarray(np.round(rng.normal(size=(16, 24)) * 8) / 8, jnp.float32)
              for i in range(40)}
    sparsities = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95]
    flat = np.concatenate([np.asarray(w).ravel() for w in scores.values()])

    leaves = select.Leaves(list(scores.values()))
    ks = jnp.asarray([round(s * flat.size) for s in sparsities], jnp.uint32)
    sample = select._sample(leaves, min(select.SAMPLE_SIZE, 4 * flat.size))  # as kth_keys does
    _, shift = select._sampled_range(sample, flat.size, ks)
    keys_per_slot = select._fine_keys_per_slot(len(sparsities), len(scores))
    assert int(shift) > keys_per_slot.bit_length() - 1  # the per-key path really runs

    masks = pruning.unstructured(scores, sparsities)
    for sparsity, mask in zip(sparsities, masks, strict=True):
        removed = np.concatenate([~np.asarray(m).ravel() for m in mask.values()])
        np.testing.assert_array_equal(removed, removed_in_order(flat, sparsity))


def test_negative_scores_are_ordered_correctly():
    scores = {"w": jnp.asarray([[-2.0, 3.0], [0.0, -0.0], [-1e-30, 1e-30]], jnp.float32)}
    mask = pruning.unstructured(scores, 0.5)
    # The three lowest: -2, -1e-30, then the first of the tied zeros in flat order (0.0 at [1, 0]).
    np.testing.assert_array_equal(np.asarray(mask["w"]),
                                  [[False, True], [False, True], [False, True]])


def test_random_and_erk_baselines():
    tree = fixed_tree(tied=False)
    key = jax.random.PRNGKey(3)
    random_mask = pruning.unstructured(pruning.random_scores(tree, key, r".*kernel"), 0.5)
    again = pruning.unstructured(pruning.random_scores(tree, key, r".*kernel"), 0.5)
    jax.tree.map(np.testing.assert_array_equal, random_mask, again)
    total = sum(layer["kernel"].size for layer in tree.values())
    assert pruned_flags(random_mask).sum() == round(0.5 * total)
    erk_mask = pruning.erk(tree, 0.5, key, where=r".*kernel")
    shapes = [layer["kernel"].shape for layer in tree.values()]
    densities = pruning.erk_densities(shapes, 0.5)
    kept = sum(d * np.prod(s) for d, s in zip(densities, shapes, strict=True))
    assert abs(kept - 0.5 * total) < 1e-6 * total or max(densities) == 1.0
    for layer_mask, density, shape in zip(erk_mask.values(), densities, shapes, strict=True):
        assert int(np.asarray(layer_mask["kernel"]).sum()) == round(density * np.prod(shape))


def test_erk_gives_smaller_layers_higher_density():
    densities = pruning.erk_densities([(768, 768), (768, 3072), (64, 64)], 0.8)
    assert densities[2] > densities[0] > densities[1]


def test_wanda_scales_magnitude_by_input_norms():
    w = jnp.asarray([[1.0, -2.0], [3.0, 0.5]])
    tree = {"dense": {"kernel": w}}
    scores = pruning.wanda(tree, {"dense/kernel": jnp.asarray([10.0, 0.1])})
    np.testing.assert_allclose(scores["dense"]["kernel"], [[10.0, 20.0], [0.3, 0.05]])
    mask = pruning.unstructured(scores, 0.5)
    np.testing.assert_array_equal(mask["dense"]["kernel"], [[True, True], [False, False]])


def test_ties_among_subnormal_scores_are_split_exactly():
    # Thresholds this small are counted on the integer keys (float arithmetic would flush the
    # subnormals to zero on CPU); the cut falls inside a block of tied subnormals.
    values = np.asarray([1e-40] * 7 + [0.0] * 5 + [2e-40] * 4 + [1.0] * 8, np.float32)
    tree = {"a": jnp.asarray(values[:12].reshape(3, 4)),
            "b": jnp.asarray(values[12:].reshape(3, 4))}
    for sparsity in (0.25, 0.5, 0.625, 0.7):
        mask = pruning.unstructured(tree, sparsity)
        k = round(sparsity * values.size)
        expected = np.zeros(values.size, bool)
        expected[np.lexsort((np.arange(values.size), values))[:k]] = True
        got = np.concatenate([~np.asarray(mask[name]).ravel() for name in "ab"])
        np.testing.assert_array_equal(got, expected)
