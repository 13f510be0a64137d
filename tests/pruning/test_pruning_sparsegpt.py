"""SparseGPT against a float64 numpy reference written from the paper's Algorithm 1; its
properties, its error against magnitude pruning's, sharded kernels and refused inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from es_jax import pruning

# Derandomized: the float32 code and the float64 reference agree on every selection that is not
# a near-tie (two scores within float32 rounding of each other), which a fixed set of examples
# checks reproducibly; a random draw could, rarely, land on one.
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)

# (in, out, block_size): several blocks, a short last block but for (64, 8, 8), and every `in`
# and block size a multiple of 8, so that each layout takes 2:4 and 4:8 too. Few layouts, so
# that examples share compiled programs.
LAYOUTS = [(40, 12, 16), (104, 20, 32), (296, 16, 128), (64, 8, 8)]
SPARSITIES = [0.3, 0.5, 0.8]
N_M = [(2, 4), (4, 8)]


def reference(kernel, hessian, sparsity=None, n=None, m=None, block_size=128, dampening=0.01):
    """(pruned kernel, kept mask), both (in, out), in float64: Algorithm 1 with plain loops."""
    w = np.array(kernel, np.float64).T.copy()  # rows = outputs, columns = inputs
    h = np.array(hessian, np.float64).copy()
    rows, columns = w.shape
    for i in range(columns):
        if h[i, i] == 0:  # a dead input
            h[i, i] = 1.0
    h += dampening * np.mean(np.diag(h)) * np.eye(columns)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, u.T @ u = h^-1
    kept = np.ones(w.shape, bool)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        w1 = w[:, start:end].copy()
        errors = np.zeros_like(w1)
        keep = np.ones(w1.shape, bool)
        if sparsity is not None:
            scores = w1**2 / np.diag(u)[start:end] ** 2
            count = round(sparsity * scores.size)
            flat = np.ones(scores.size, bool)
            flat[np.lexsort((np.arange(scores.size), scores.ravel()))[:count]] = False
            keep = flat.reshape(w1.shape)
        for i in range(end - start):
            if n is not None and i % m == 0:
                for r in range(rows):
                    scores = w1[r, i:i + m] ** 2 / np.diag(u)[start + i:start + i + m] ** 2
                    best = sorted(range(m), key=lambda j, s=scores: (-s[j], j))[:n]
                    keep[r, i:i + m] = [j in best for j in range(m)]
            q = np.where(keep[:, i], w1[:, i], 0.0)
            err = (w1[:, i] - q) / u[start + i, start + i]
            w1[:, i:] -= np.outer(err, u[start + i, start + i:end])
            w1[:, i] = q
            errors[:, i] = err
        w[:, start:end] = w1
        kept[:, start:end] = keep
        w[:, end:] -= errors @ u[start:end, end:]
    return w.T, kept.T


def layer(inputs, outputs, seed, dead=0, tokens=None):
    """A float32 kernel and the Gram matrix of correlated inputs X = Z @ A (`dead` features of X
    zero on every token)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(tokens or 2 * inputs, inputs))
    x = z @ (rng.normal(size=(inputs, inputs)) / np.sqrt(inputs) + np.eye(inputs))
    x[:, rng.choice(inputs, dead, replace=False)] = 0.0
    kernel = rng.normal(size=(inputs, outputs)).astype(np.float32)
    return kernel, (x.T @ x).astype(np.float32), x


def check_against_reference(kernel, hessian, block_size, **setting):
    """Runs both; checks the masks, kernels, error and the structure the setting promises."""
    result = pruning.sparsegpt(kernel, hessian, block_size=block_size, **setting)
    expected_kernel, expected_mask = reference(kernel, hessian, block_size=block_size, **setting)
    pruned, mask = np.asarray(result.kernel), np.asarray(result.mask)
    assert mask.dtype == np.bool_
    assert pruned.dtype == np.float32
    np.testing.assert_array_equal(mask, expected_mask)
    scale = np.abs(expected_kernel).max()
    np.testing.assert_allclose(pruned, expected_kernel, rtol=1e-4, atol=1e-5 * scale)
    assert np.all(pruned[~mask] == 0), "a pruned weight is not exactly 0"
    nonzero = kernel != 0
    np.testing.assert_array_equal(mask[nonzero], pruned[nonzero] != 0)
    expected_error = pruning.reconstruction_error(kernel, pruned, hessian)
    np.testing.assert_allclose(float(result.error), float(expected_error), rtol=1e-5)
    return mask


@SETTINGS
@given(layout=st.sampled_from(LAYOUTS), sparsity=st.sampled_from(SPARSITIES),
       seed=st.integers(0, 2**16), dead=st.integers(0, 2))
def test_unstructured_matches_the_reference_and_prunes_exact_counts_per_block(layout, sparsity,
                                                                               seed, dead):
    inputs, outputs, block_size = layout
    kernel, hessian, _ = layer(inputs, outputs, seed, dead)
    mask = check_against_reference(kernel, hessian, block_size, sparsity=sparsity)
    for start in range(0, inputs, block_size):
        block = mask[start:start + block_size]
        assert np.sum(~block) == round(sparsity * block.size)


@SETTINGS
@given(layout=st.sampled_from(LAYOUTS), n_m=st.sampled_from(N_M), seed=st.integers(0, 2**16),
       dead=st.integers(0, 2))
def test_n_of_m_matches_the_reference_and_keeps_n_of_each_m_inputs(layout, n_m, seed, dead):
    inputs, outputs, block_size = layout
    n, m = n_m
    kernel, hessian, _ = layer(inputs, outputs, seed, dead)
    mask = check_against_reference(kernel, hessian, block_size, n=n, m=m)
    np.testing.assert_array_equal(mask.reshape(inputs // m, m, outputs).sum(axis=1), n)


@pytest.mark.parametrize("setting", [{"sparsity": 0.5}, {"n": 2, "m": 4}])
def test_ties_follow_flat_position_and_lower_column(setting):
    # H = 2 I: U is diagonal and constant, so every score is w^2 / const, no weight is updated,
    # and a small integer kernel is all ties.
    kernel = np.random.default_rng(0).integers(-2, 3, size=(40, 12)).astype(np.float32)
    hessian = 2 * np.eye(40, dtype=np.float32)
    check_against_reference(kernel, hessian, 16, **setting)


def test_result_is_invariant_to_a_positive_scale_of_the_hessian():
    kernel, hessian, _ = layer(104, 20, seed=3)
    base = pruning.sparsegpt(kernel, hessian, sparsity=0.5, block_size=32)
    for scale in (1e-3, 7.0, 1e3):
        scaled = pruning.sparsegpt(kernel, hessian * np.float32(scale), sparsity=0.5,
                                   block_size=32)
        np.testing.assert_array_equal(scaled.mask, base.mask)
        np.testing.assert_allclose(scaled.kernel, base.kernel, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(scaled.error), scale * float(base.error), rtol=1e-4)


@pytest.mark.parametrize("setting", [{"sparsity": 0.0}, {"n": 4, "m": 4}])
def test_pruning_nothing_returns_the_kernel_unchanged(setting):
    kernel, hessian, _ = layer(64, 8, seed=1, dead=1)
    result = pruning.sparsegpt(kernel, hessian, block_size=8, **setting)
    np.testing.assert_array_equal(result.kernel, kernel)
    assert bool(np.all(result.mask))
    assert float(result.error) == 0.0


def test_bf16_kernel_is_pruned_in_float32_and_returned_in_bf16():
    kernel, hessian, _ = layer(40, 12, seed=2)
    low = jnp.asarray(kernel, jnp.bfloat16)
    result = pruning.sparsegpt(low, hessian, sparsity=0.5, block_size=16)
    wide = pruning.sparsegpt(low.astype(jnp.float32), hessian, sparsity=0.5, block_size=16)
    assert result.kernel.dtype == jnp.bfloat16
    assert result.error.dtype == jnp.float32
    np.testing.assert_array_equal(result.mask, wide.mask)
    np.testing.assert_array_equal(result.kernel, wide.kernel.astype(jnp.bfloat16))


def magnitude_pruned(kernel, count=None, n=None, m=None):
    """The kernel with its `count` smallest |w| zeroed (ties by flat position), or N:M by |w|."""
    if n is not None:
        mask = pruning.n_of_m({"k": np.abs(kernel)}, n, m)["k"]
        return np.where(mask, kernel, 0)
    flat = kernel.ravel().copy()
    flat[np.lexsort((np.arange(flat.size), np.abs(flat)))[:count]] = 0
    return flat.reshape(kernel.shape)


@pytest.mark.parametrize("setting", [{"sparsity": 0.3}, {"sparsity": 0.5}, {"sparsity": 0.8},
                                     {"n": 2, "m": 4}])
def test_error_is_lower_than_magnitude_pruning_of_as_many_weights(setting):
    kernel, hessian, _ = layer(104, 20, seed=5, tokens=512)
    result = pruning.sparsegpt(kernel, hessian, block_size=32, **setting)
    removed = int(np.sum(~np.asarray(result.mask)))
    baseline = magnitude_pruned(kernel, removed, setting.get("n"), setting.get("m"))
    assert int(np.sum(baseline == 0)) == removed
    magnitude_error = float(pruning.reconstruction_error(kernel, baseline, hessian))
    assert float(result.error) < magnitude_error


def test_reconstruction_error_is_the_squared_output_difference():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 12))
    kernel, pruned = rng.normal(size=(12, 5)), rng.normal(size=(12, 5))
    expected = np.sum((x @ kernel - x @ pruned) ** 2)
    value = pruning.reconstruction_error(kernel.astype(np.float32), pruned.astype(np.float32),
                                         (x.T @ x).astype(np.float32))
    assert value.dtype == jnp.float32
    assert value.shape == ()
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        pruning.reconstruction_error(kernel, pruned[:, :4], x.T @ x)
    with pytest.raises(ValueError, match="hessian has shape"):
        pruning.reconstruction_error(kernel, pruned, x.T @ x[:, :11])


def test_sharded_kernel_gives_the_unsharded_result():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host CPU devices"
    kernel, hessian, _ = layer(64, 16, seed=6)
    plain = pruning.sparsegpt(kernel, hessian, sparsity=0.5, block_size=16)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    sharding = NamedSharding(mesh, PartitionSpec("data", "model"))
    sharded = pruning.sparsegpt(jax.device_put(kernel, sharding), hessian, sparsity=0.5,
                                block_size=16)
    assert sharded.kernel.sharding == sharding
    assert sharded.mask.sharding == sharding
    np.testing.assert_array_equal(sharded.mask, plain.mask)
    np.testing.assert_allclose(sharded.kernel, plain.kernel, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(sharded.error), float(plain.error), rtol=1e-5)
    # Under a caller's jit, with the input axis sharded: the compiler places the program.
    by_input = jax.device_put(kernel, NamedSharding(mesh, PartitionSpec(("data", "model"))))
    jitted = jax.jit(lambda k, h: pruning.sparsegpt(k, h, sparsity=0.5, block_size=16))
    inside = jitted(by_input, hessian)
    np.testing.assert_array_equal(inside.mask, plain.mask)
    np.testing.assert_allclose(inside.kernel, plain.kernel, rtol=1e-6, atol=1e-6)


GOOD_KERNEL = np.ones((8, 4), np.float32)
GOOD_HESSIAN = np.eye(8, dtype=np.float32)


@pytest.mark.parametrize(("kernel", "hessian", "setting", "message"), [
    (np.ones(8, np.float32), GOOD_HESSIAN, {"sparsity": 0.5}, "2-D floating-point"),
    (np.ones((8, 4), np.int32), GOOD_HESSIAN, {"sparsity": 0.5}, "2-D floating-point"),
    (GOOD_KERNEL, np.eye(4, dtype=np.float32), {"sparsity": 0.5}, r"expected \(in, in\)"),
    (GOOD_KERNEL, GOOD_HESSIAN, {"sparsity": 1.0}, r"outside \[0, 1\)"),
    (GOOD_KERNEL, GOOD_HESSIAN, {"sparsity": -0.1}, r"outside \[0, 1\)"),
    (GOOD_KERNEL, GOOD_HESSIAN, {"sparsity": "0.5"}, "must be a number"),
    (GOOD_KERNEL, GOOD_HESSIAN, {}, "exactly one of"),
    (GOOD_KERNEL, GOOD_HESSIAN, {"sparsity": 0.5, "n": 2, "m": 4}, "exactly one of"),
    (GOOD_KERNEL, GOOD_HESSIAN, {"n": 2}, "both n and m"),
    (GOOD_KERNEL, GOOD_HESSIAN, {"n": 5, "m": 4}, "1 <= n <= m"),
    (GOOD_KERNEL, GOOD_HESSIAN, {"n": 0, "m": 4}, "at least 1"),
    (GOOD_KERNEL, GOOD_HESSIAN, {"n": 2.0, "m": 4}, "Python int"),
    (GOOD_KERNEL, GOOD_HESSIAN, {"n": 2, "m": 3}, "multiples of m"),
    (GOOD_KERNEL, GOOD_HESSIAN, {"n": 2, "m": 4, "block_size": 6}, "multiples of m"),
    (GOOD_KERNEL, GOOD_HESSIAN, {"sparsity": 0.5, "block_size": 0}, "at least 1"),
    (GOOD_KERNEL, GOOD_HESSIAN, {"sparsity": 0.5, "dampening": -1.0}, "dampening"),
    (GOOD_KERNEL, GOOD_HESSIAN, {"sparsity": 0.5, "dampening": np.nan}, "dampening"),
])
def test_bad_arguments_are_refused(kernel, hessian, setting, message):
    with pytest.raises(ValueError, match=message):
        pruning.sparsegpt(kernel, hessian, **setting)


def test_traced_sparsity_is_refused():
    with pytest.raises(ValueError, match="sparsity is traced"):
        jax.jit(lambda s: pruning.sparsegpt(GOOD_KERNEL, GOOD_HESSIAN, sparsity=s))(0.5)


def test_non_finite_inputs_and_an_indefinite_hessian_are_refused():
    bad_kernel = GOOD_KERNEL.copy()
    bad_kernel[3, 1] = np.nan
    with pytest.raises(ValueError, match="the kernel contains NaN or inf"):
        pruning.sparsegpt(bad_kernel, GOOD_HESSIAN, sparsity=0.5)
    bad_hessian = GOOD_HESSIAN.copy()
    bad_hessian[2, 5] = np.inf
    with pytest.raises(ValueError, match="the hessian contains NaN or inf"):
        pruning.sparsegpt(GOOD_KERNEL, bad_hessian, sparsity=0.5)
    with pytest.raises(ValueError, match=r"not positive definite.*larger `dampening`"):
        pruning.sparsegpt(GOOD_KERNEL, -GOOD_HESSIAN, sparsity=0.5)
    # Under jit nothing can be refused: an indefinite Hessian gives a non-finite result.
    jitted = jax.jit(lambda k, h: pruning.sparsegpt(k, h, sparsity=0.5))
    assert not np.all(np.isfinite(np.asarray(jitted(GOOD_KERNEL, -GOOD_HESSIAN).kernel)))
