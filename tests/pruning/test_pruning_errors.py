"""Bad input is refused with a ValueError that names the leaf and the problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from es_jax import pruning


@pytest.fixture
def params():
    rng = np.random.default_rng(0)
    return {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
                      "bias": jnp.zeros(6)},
            "steps": jnp.arange(3),
            "other": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}}


@pytest.mark.parametrize("sparsity", [-0.1, 1.5, [0.2, 1.01]])
def test_sparsity_outside_unit_interval(params, sparsity):
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        pruning.unstructured(pruning.magnitude(params, r".*kernel"), sparsity)


@pytest.mark.parametrize(("n", "m"), [(5, 4), (-1, 4), (1, 0)])
def test_n_of_m_bounds(params, n, m):
    with pytest.raises(ValueError, match="0 <= n <= m"):
        pruning.n_of_m(pruning.magnitude(params, r".*kernel"), n=n, m=m)


def test_n_of_m_axis_not_divisible_names_the_leaf(params):
    with pytest.raises(ValueError, match=r"'dense/kernel'.*not divisible by m=3"):
        pruning.n_of_m(pruning.magnitude(params, r"dense/kernel"), n=1, m=3, axis=0)


def test_selector_matching_nothing(params):
    with pytest.raises(ValueError, match="matches no leaf"):
        pruning.magnitude(params, r"encoder/.*")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_target_names_the_leaf(params, bad):
    params["other"]["kernel"] = params["other"]["kernel"].at[1, 2].set(bad)
    with pytest.raises(ValueError, match=r"'other/kernel' contains NaN or inf"):
        pruning.omp(params, 0.5, where=r".*kernel")


def test_non_finite_leaf_outside_the_targets_is_fine(params):
    params["dense"]["bias"] = params["dense"]["bias"].at[0].set(np.nan)
    pruned, _ = pruning.omp(params, 0.5, where=r".*kernel")
    assert np.isnan(pruned["dense"]["bias"][0])


def test_integer_leaf_selected(params):
    with pytest.raises(ValueError, match=r"'steps' has dtype int32"):
        pruning.magnitude(params, r"steps|.*kernel")


def test_mask_of_another_structure(params):
    _, mask = pruning.omp(params, 0.5, where=r".*kernel")
    del mask["other"]
    with pytest.raises(ValueError, match="structure of the parameters"):
        pruning.apply(params, mask)


def test_mask_of_another_shape_names_the_leaf(params):
    _, mask = pruning.omp(params, 0.5, where=r".*kernel")
    mask["other"]["kernel"] = jnp.ones((4, 6), bool)
    with pytest.raises(ValueError, match=r"'other/kernel' has shape \(4, 6\).*\(6, 4\)"):
        pruning.apply(params, mask)


def test_similarity_of_masks_with_different_targets(params):
    _, a = pruning.omp(params, 0.5, where=r".*kernel")
    _, b = pruning.omp(params, 0.5, where=r"dense/kernel")
    with pytest.raises(ValueError, match="other/kernel"):
        pruning.similarity(a, b)


def test_wanda_without_norms_for_a_target(params):
    with pytest.raises(ValueError, match=r"no input norms for target leaf 'other/kernel'"):
        pruning.wanda(params, {"dense/kernel": jnp.ones(8)}, where=r".*kernel")


def test_wanda_norms_of_the_wrong_length(params):
    with pytest.raises(ValueError, match=r"'dense/kernel' have shape \(6,\), expected \(8,\)"):
        pruning.wanda(params, {"dense/kernel": jnp.ones(6)}, where=r"dense/kernel")


def test_unknown_scope(params):
    with pytest.raises(ValueError, match="scope must be"):
        pruning.unstructured(pruning.magnitude(params, r".*kernel"), 0.5, scope="per-row")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int8, jnp.uint8])
def test_apply_refuses_a_mask_leaf_that_is_not_bool(params, dtype):
    _, mask = pruning.omp(params, 0.5, where=r".*kernel")
    mask["other"]["kernel"] = mask["other"]["kernel"].astype(dtype)
    with pytest.raises(ValueError, match=rf"mask at 'other/kernel' has dtype {jnp.dtype(dtype)}"):
        pruning.apply(params, mask)
    with pytest.raises(ValueError, match=r"mask at 'other/kernel' has dtype"):
        pruning.filled_mask(mask, params)


def test_apply_refuses_a_scores_tree_passed_as_a_mask(params):
    scores = pruning.magnitude(params, r".*kernel")
    with pytest.raises(ValueError, match=r"mask at 'dense/kernel' has dtype float32.*unstructured"):
        pruning.apply(params, scores)


def test_apply_refuses_a_non_bool_mask_under_jit(params):
    scores = pruning.magnitude(params, r".*kernel")
    with pytest.raises(ValueError, match=r"mask at 'dense/kernel' has dtype float32"):
        jax.jit(pruning.apply)(params, scores)


def test_empty_list_of_sparsities(params):
    with pytest.raises(ValueError, match="no sparsity level"):
        pruning.unstructured(pruning.magnitude(params, r".*kernel"), [])
    with pytest.raises(ValueError, match="no sparsity level"):
        pruning.omp(params, [], where=r".*kernel")


@pytest.mark.parametrize("as_list", [False, True])
def test_traced_sparsity_asks_for_a_python_float(params, as_list):
    scores = pruning.magnitude(params, r".*kernel")
    prune = jax.jit(lambda s: pruning.unstructured(scores, [s] if as_list else s))
    with pytest.raises(ValueError, match=r"sparsity is traced.*Python float.*static"):
        prune(0.5)
    with pytest.raises(ValueError, match=r"sparsity is traced"):
        jax.jit(lambda s: pruning.omp(params, s, where=r".*kernel"))(0.5)
    with pytest.raises(ValueError, match=r"sparsity is traced"):
        jax.jit(lambda s: pruning.erk(params, s, jax.random.PRNGKey(0), r".*kernel"))(0.5)


@pytest.mark.parametrize("sparsity", ["0.5", None, [[0.1, 0.2]], np.ones((2, 2))])
def test_sparsity_that_is_not_a_number(params, sparsity):
    with pytest.raises(ValueError, match="sparsity level is a number"):
        pruning.unstructured(pruning.magnitude(params, r".*kernel"), sparsity)


def test_erk_takes_one_sparsity(params):
    with pytest.raises(ValueError, match="one sparsity"):
        pruning.erk(params, [0.5, 0.6], jax.random.PRNGKey(0), r".*kernel")


def test_erk_refuses_a_sparsity_that_leaves_fewer_weights_than_leaves(params):
    # 72 target weights in 2 leaves: 0.99 keeps round(0.72) = 1 weight, not one per leaf.
    with pytest.raises(ValueError, match=r"keeps 1 of 72 weights.*2 target leaves"):
        pruning.erk(params, 0.99, jax.random.PRNGKey(0), r".*kernel")
    with pytest.raises(ValueError, match=r"keeps 1 of 72 weights.*2 target leaves"):
        pruning.erk_densities([(8, 6), (6, 4)], 0.99)
