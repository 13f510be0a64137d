"""Per-output unstructured masks (Wanda's comparison group) against a numpy reference."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from es_jax import pruning

SETTINGS = settings(max_examples=20, deadline=None)
SHAPES = ((8, 6), (12, 4), (3, 4, 5))


def reference_pruned(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Pruned flags: each slice scores[..., j] loses its round(s * size) lowest scores, ties by
    flat position in the slice, NaN/inf lowest."""
    pruned = np.zeros(scores.shape, bool)
    group = scores.size // scores.shape[-1]
    k = round(sparsity * group)
    for j in range(scores.shape[-1]):
        column = scores[..., j].ravel()
        keys = np.where(np.isfinite(column), column, -np.inf)
        order = np.lexsort((np.arange(group), keys))
        flags = np.zeros(group, bool)
        flags[order[:k]] = True
        pruned[..., j] = flags.reshape(scores.shape[:-1])
    return pruned


@SETTINGS
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16),
       sparsities=st.lists(st.floats(0, 1), min_size=1, max_size=3), tied=st.booleans())
def test_each_output_loses_exactly_its_lowest_scores(shape, seed, sparsities, tied):
    rng = np.random.default_rng(seed)
    values = rng.integers(-2, 3, shape) if tied else rng.normal(size=shape)
    scores = {"a": {"kernel": jnp.asarray(values, jnp.float32)}}
    masks = pruning.unstructured(scores, sparsities, scope="per_output")
    for sparsity, mask in zip(sparsities, masks, strict=True):
        np.testing.assert_array_equal(~np.asarray(mask["a"]["kernel"]),
                                      reference_pruned(values.astype(np.float32), sparsity))


def test_levels_nest_and_transform_equals_stored_scores():
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    low, high = pruning.unstructured({"k": kernel}, [0.25, 0.75], scope="per_output",
                                     transform=jnp.abs)
    assert not np.any(np.asarray(high["k"]) & ~np.asarray(low["k"]))
    stored = pruning.unstructured({"k": jnp.abs(kernel)}, 0.75, scope="per_output")
    np.testing.assert_array_equal(np.asarray(high["k"]), np.asarray(stored["k"]))
    pruned, mask = pruning.omp({"k": kernel}, 0.75, scope="per_output")
    np.testing.assert_array_equal(np.asarray(mask["k"]), np.asarray(stored["k"]))
    assert np.all(np.sum(~np.asarray(mask["k"]), axis=0) == 12)
    assert np.all(np.asarray(pruned["k"])[~np.asarray(mask["k"])] == 0)


def test_wanda_per_output_compares_within_each_output_unit():
    # Input feature 0 has a large norm: global Wanda would keep all of row 0 and prune whole
    # outputs with small weights; per output, every output unit keeps half its inputs.
    kernel = jnp.asarray([[1.0, 0.01], [2.0, 0.02], [3.0, 0.03], [4.0, 0.04]])
    norms = {"k": jnp.asarray([10.0, 1.0, 1.0, 1.0])}
    scores = pruning.wanda({"k": kernel}, norms, where="k")
    per_output = np.asarray(pruning.unstructured(scores, 0.5, scope="per_output")["k"])
    # Column scores (10, 2, 3, 4) and (0.1, 0.02, 0.03, 0.04): rows 1 and 2 go in both.
    np.testing.assert_array_equal(per_output, [[True, True], [False, False], [False, False],
                                               [True, True]])
    global_mask = np.asarray(pruning.unstructured(scores, 0.5)["k"])
    assert not global_mask[:, 1].any()
    assert global_mask[:, 0].all()


def test_per_output_refuses_a_leaf_without_an_input_axis():
    with pytest.raises(ValueError, match=r"'bias'.*at least 2 axes"):
        pruning.unstructured({"bias": jnp.ones(4)}, 0.5, scope="per_output")
    with pytest.raises(ValueError, match="scope must be one of"):
        pruning.unstructured({"k": jnp.ones((2, 2))}, 0.5, scope="rows")
