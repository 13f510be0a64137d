"""filled_mask and target_leaf_flags: a mask for code that cannot take None leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from es_jax import pruning

SETTINGS = settings(max_examples=20, deadline=None)
SHAPES = {"embed": (10, 4), "layer0/kernel": (4, 8), "layer0/bias": (8,), "layer1/kernel": (8, 4)}


def nested(flat: dict) -> dict:
    """A nested dict from '/'-joined keys."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, name = path.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return tree


@st.composite
def params_and_masks(draw: st.DrawFn) -> tuple[dict, dict]:
    """Random parameters of SHAPES and a random mask on a non-empty random subset of leaves."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    targets = draw(st.sets(st.sampled_from(sorted(SHAPES)), min_size=1))
    params = {path: jnp.asarray(rng.normal(size=shape), jnp.float32)
              for path, shape in SHAPES.items()}
    mask = {path: jnp.asarray(rng.random(shape) < 0.5) if path in targets else None
            for path, shape in SHAPES.items()}
    return nested(params), nested(mask)


def leaves_with_none(tree: dict) -> list:
    """The leaves of a mask, None leaves included, in leaf order."""
    return jax.tree.leaves(tree, is_leaf=lambda x: x is None)


@SETTINGS
@given(trees=params_and_masks())
def test_filled_mask_keeps_target_leaves_and_fills_the_others_with_true(trees):
    params, mask = trees
    filled = pruning.filled_mask(mask, params)
    assert jax.tree.structure(filled) == jax.tree.structure(params)
    for param, keep, full in zip(jax.tree.leaves(params), leaves_with_none(mask),
                                 jax.tree.leaves(filled), strict=True):
        if keep is None:
            assert full.dtype == jnp.bool_
            assert full.shape == param.shape
            assert np.asarray(full).all()
        else:
            assert full is keep


@SETTINGS
@given(trees=params_and_masks())
def test_filled_mask_in_a_plain_tree_map_equals_apply(trees):
    params, mask = trees
    filled = pruning.filled_mask(mask, params)
    zeroed = jax.tree.map(lambda p, m: jnp.where(m, p, 0), params, filled)
    jax.tree.map(np.testing.assert_array_equal, zeroed, pruning.apply(params, mask))
    in_jit = jax.jit(lambda p, m: jax.tree.map(lambda x, k: jnp.where(k, x, 0), p,
                                               pruning.filled_mask(m, p)))(params, mask)
    jax.tree.map(np.testing.assert_array_equal, in_jit, zeroed)


@SETTINGS
@given(trees=params_and_masks())
def test_target_leaf_flags_are_true_exactly_on_the_target_leaves(trees):
    _, mask = trees
    flags = pruning.target_leaf_flags(mask)
    assert jax.tree.structure(flags) == jax.tree.structure(mask, is_leaf=lambda x: x is None)
    assert jax.tree.leaves(flags) == [keep is not None for keep in leaves_with_none(mask)]
    assert all(type(flag) is bool for flag in jax.tree.leaves(flags))


@SETTINGS
@given(trees=params_and_masks())
def test_optax_masked_with_target_leaf_flags_transforms_the_targets_only(trees):
    params, mask = trees
    tx = optax.masked(optax.add_decayed_weights(0.5), pruning.target_leaf_flags(mask))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for grad, param, keep, update in zip(jax.tree.leaves(grads), jax.tree.leaves(params),
                                         leaves_with_none(mask), jax.tree.leaves(updates),
                                         strict=True):
        expected = grad if keep is None else grad + 0.5 * param
        np.testing.assert_array_equal(update, expected)


def test_both_forms_work_on_nnx_state():
    model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    mask = jax.tree.map(lambda p: None if p.ndim == 1 else jnp.abs(p) > 0.3, params)
    filled = pruning.filled_mask(mask, params)
    assert np.asarray(filled["bias"][...]).all()
    np.testing.assert_array_equal(filled["kernel"][...], mask["kernel"][...])
    tx = optax.masked(optax.add_decayed_weights(0.5), pruning.target_leaf_flags(mask))
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["bias"][...], 0)
    np.testing.assert_array_equal(updates["kernel"][...], 0.5 * params["kernel"][...])


def test_filled_leaves_have_the_parameters_sharding():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host CPU devices"
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    sharding = NamedSharding(mesh, PartitionSpec("data", "model"))
    params = {"embed": jax.device_put(jnp.ones((16, 8)), sharding),
              "kernel": jax.device_put(jnp.ones((8, 4)), sharding)}
    mask = {"embed": None, "kernel": jax.device_put(jnp.ones((8, 4), bool), sharding)}
    filled = pruning.filled_mask(mask, params)
    assert filled["embed"].sharding == params["embed"].sharding


def test_a_mask_of_another_shape_is_refused_with_the_leaf_named():
    params = {"layer": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)}}
    mask = {"layer": {"kernel": jnp.ones((4, 4), bool), "bias": None}}
    with pytest.raises(ValueError, match="'layer/kernel' has shape"):
        pruning.filled_mask(mask, params)
