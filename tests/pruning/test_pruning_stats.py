"""Sparsity report, near-zero fractions and mask similarity against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es_jax import pruning


def test_paths_of_nnx_state_and_dicts():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    assert pruning.leaf_paths(state) == ["layers/0/bias", "layers/0/kernel", "layers/1/bias",
                                         "layers/1/kernel"]
    assert pruning.leaf_paths({"a": [jnp.ones(1), {"b": jnp.ones(1)}]}) == ["a/0", "a/1/b"]


def test_omp_on_nnx_state_keeps_its_type_and_updates_the_model():
    model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    pruned, mask = pruning.omp(nnx.state(model, nnx.Param), 0.25, where="kernel")
    assert isinstance(pruned, nnx.State)
    nnx.update(model, pruned)
    assert int(jnp.sum(model.kernel[...] == 0)) == 32
    assert mask["bias"] is None or mask["bias"].get_value() is None


def test_report_counts_zeros_per_leaf_target_set_and_tree():
    params = {"a": jnp.asarray([[0.0, 1.0], [2.0, 0.0]]), "b": jnp.asarray([[0.0, 3.0, 4.0]]),
              "bias": jnp.zeros(5)}
    report = pruning.report(params, where=r"a|b")
    assert report["leaves"]["a"]["zeros"] == 2
    assert report["leaves"]["a"]["target"]
    assert report["target"] == {"zeros": 3, "size": 7, "sparsity": 3 / 7}
    assert report["model"] == {"zeros": 8, "size": 12, "sparsity": 8 / 12}
    table = pruning.format_report(report)
    assert "target set" in table
    assert "42.86%" in table


def test_near_zero_absolute_and_relative():
    rng = np.random.default_rng(0)
    w = rng.normal(scale=0.1, size=(100, 50)).astype(np.float32)
    params = {"w": jnp.asarray(w), "bias": jnp.asarray(rng.normal(size=7), jnp.float32)}
    absolute = pruning.near_zero(params, [1e-3, 1e-2], where="w")
    np.testing.assert_allclose(absolute["target"], [np.mean(np.abs(w) < t) for t in (1e-3, 1e-2)])
    everything = np.concatenate([w.ravel(), np.asarray(params["bias"])])
    np.testing.assert_allclose(absolute["model"], [np.mean(np.abs(everything) < t)
                                                   for t in (1e-3, 1e-2)])
    relative = pruning.near_zero(params, [0.5], where="w", relative=True)
    np.testing.assert_allclose(relative["leaves"]["w"], [np.mean(np.abs(w) < 0.5 * w.std())],
                               rtol=1e-6)


def test_similarity_against_direct_counts():
    rng = np.random.default_rng(1)
    a = {"x": jnp.asarray(rng.random((40, 30)) > 0.3), "y": None}
    b = {"x": jnp.asarray(rng.random((40, 30)) > 0.6), "y": None}
    got = pruning.similarity(a, b)
    ka, kb = np.asarray(a["x"]).ravel(), np.asarray(b["x"]).ravel()
    assert got["cosine"] == pytest.approx(np.sum(ka & kb) / np.sqrt(ka.sum() * kb.sum()))
    assert got["iou"] == pytest.approx(np.sum(~ka & ~kb) / np.sum(~ka | ~kb))
    assert got["hamming"] == int(np.sum(ka != kb))
    da, db = ka.mean(), kb.mean()
    assert got["chance_cosine"] == pytest.approx(np.sqrt(da * db))
    assert got["chance_iou"] == pytest.approx((1 - da) * (1 - db) / (1 - da * db))
    identical = pruning.similarity(a, a)
    assert identical["cosine"] == pytest.approx(1.0)
    assert identical["iou"] == 1.0


def test_random_masks_match_the_chance_baseline():
    params = {"w": jnp.ones((300, 300))}
    a = pruning.unstructured(pruning.random_scores(params, jax.random.PRNGKey(0)), 0.4)
    b = pruning.unstructured(pruning.random_scores(params, jax.random.PRNGKey(1)), 0.4)
    got = pruning.similarity(a, b)
    assert got["cosine"] == pytest.approx(got["chance_cosine"], abs=0.01)
    assert got["iou"] == pytest.approx(got["chance_iou"], abs=0.01)


def test_stats_work_under_jit():
    params = {"w": jnp.asarray([[0.0, 1.0], [0.5, 0.0]])}
    sparsity = jax.jit(lambda p: pruning.report(p)["target"]["sparsity"])(params)
    assert float(sparsity) == 0.5
    a = {"w": jnp.asarray([[True, False], [True, True]])}
    b = {"w": jnp.asarray([[True, True], [False, True]])}
    jitted = jax.jit(pruning.similarity)(a, b)
    for key, value in pruning.similarity(a, b).items():
        assert float(jitted[key]) == pytest.approx(value), key
