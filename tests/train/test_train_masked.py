"""keep_pruned_zero: pruned weights and their Adam moments stay exactly zero under AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from es_jax.train.masked import keep_pruned_zero

STEPS = 10


def random_grads(params, step):
    """Gaussian gradients of the parameters' structure, seeded by step."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(step), len(leaves))
    grads = [
        jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, grads)


def train(tx, params, steps=STEPS):
    """`steps` updates of `tx` on random gradients, jitted; returns params and state."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(steps):
        updates, state = update(random_grads(params, step), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.fixture
def params():
    """A dict with two kernels (targets) and a bias (not a target)."""
    keys = jax.random.split(jax.random.key(0), 2)
    return {
        "dense": {"kernel": jax.random.normal(keys[0], (8, 6)), "bias": jnp.zeros(6)},
        "out": {"kernel": jax.random.normal(keys[1], (6, 4))},
    }


@pytest.fixture
def mask(params):
    """Half of each kernel pruned at random; the bias off-target (None)."""
    keys = jax.random.split(jax.random.key(1), 2)
    return {
        "dense": {"kernel": jax.random.bernoulli(keys[0], 0.5, (8, 6)), "bias": None},
        "out": {"kernel": jax.random.bernoulli(keys[1], 0.5, (6, 4))},
    }


def pruned_entries(tree, mask):
    """The entries of `tree` where the mask prunes (False), concatenated."""
    return np.concatenate(
        [
            np.asarray(tree[name]["kernel"])[~np.asarray(mask[name]["kernel"])]
            for name in ("dense", "out")
        ]
    )


def kept_entries(tree, mask):
    """The entries of `tree` where the mask keeps (True), concatenated."""
    return np.concatenate(
        [
            np.asarray(tree[name]["kernel"])[np.asarray(mask[name]["kernel"])]
            for name in ("dense", "out")
        ]
    )


def test_adamw_with_weight_decay_keeps_pruned_weights_and_moments_zero(params, mask):
    start = jax.tree.map(
        lambda p, m: p if m is None else jnp.where(m, p, 0),
        params,
        mask,
        is_leaf=lambda x: x is None,
    )
    tx = keep_pruned_zero(optax.adamw(1e-2, weight_decay=0.1), mask)
    trained, state = train(tx, start)
    assert (pruned_entries(trained, mask) == 0).all()
    mu, nu = optax.tree_utils.tree_get(state, "mu"), optax.tree_utils.tree_get(state, "nu")
    assert (pruned_entries(mu, mask) == 0).all()
    assert (pruned_entries(nu, mask) == 0).all()
    assert (kept_entries(trained, mask) != kept_entries(start, mask)).all()
    assert (kept_entries(nu, mask) > 0).all()
    assert (np.asarray(trained["dense"]["bias"]) != 0).all()


def test_pruned_weights_that_start_nonzero_become_exactly_zero(params, mask):
    tx = keep_pruned_zero(optax.adamw(1e-3, weight_decay=0.01), mask)
    trained, _ = train(tx, params, steps=1)
    assert (pruned_entries(params, mask) != 0).all()
    assert (pruned_entries(trained, mask) == 0).all()


def test_off_target_and_kept_weights_train_like_plain_adamw(params, mask):
    inner = optax.adamw(1e-2, weight_decay=0.1)
    masked, _ = train(keep_pruned_zero(inner, mask), params)
    plain, _ = train(inner, params)
    # Equal up to float rounding: XLA fuses the masked update differently.
    np.testing.assert_allclose(masked["dense"]["bias"], plain["dense"]["bias"], rtol=1e-6)
    np.testing.assert_allclose(kept_entries(masked, mask), kept_entries(plain, mask), rtol=1e-6)


def test_nnx_state_params_and_masks():
    model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    mask = jax.tree.map(lambda p: None if p.ndim == 1 else jnp.abs(p) > 0.3, params)
    kernel_mask = np.asarray(mask["kernel"][...])
    assert 0 < kernel_mask.sum() < kernel_mask.size
    trained, state = train(keep_pruned_zero(optax.adamw(1e-2, weight_decay=0.1), mask), params)
    kernel = np.asarray(trained["kernel"][...])
    assert (kernel[~kernel_mask] == 0).all()
    assert (kernel[kernel_mask] != 0).all()
    mu = np.asarray(optax.tree_utils.tree_get(state, "mu")["kernel"][...])
    assert (mu[~kernel_mask] == 0).all()
    assert (np.asarray(trained["bias"][...]) != 0).all()


def test_one_compiled_update_serves_every_mask(params, mask):
    other = jax.tree.map(lambda m: None if m is None else ~m, mask, is_leaf=lambda x: x is None)
    inner = optax.adamw(1e-2)
    update = jax.jit(keep_pruned_zero(inner, None).update)
    for level_mask in (mask, other):
        state = keep_pruned_zero(inner, level_mask).init(params)
        updates, _ = update(random_grads(params, 0), state, params)
        moved = optax.apply_updates(params, updates)
        assert (pruned_entries(moved, level_mask) == 0).all()
    assert update._cache_size() == 1


@pytest.mark.parametrize(
    ("bad_mask", "message"),
    [
        (
            {
                "dense": {"kernel": jnp.ones((8, 5), bool), "bias": None},
                "out": {"kernel": jnp.ones((6, 4), bool)},
            },
            "shape",
        ),
        (
            {
                "dense": {"kernel": jnp.ones((8, 6)), "bias": None},
                "out": {"kernel": jnp.ones((6, 4), bool)},
            },
            "bool",
        ),
        ({"dense": {"kernel": jnp.ones((8, 6), bool)}}, "structure"),
    ],
)
def test_masks_that_do_not_fit_are_refused(params, bad_mask, message):
    with pytest.raises(ValueError, match=message):
        keep_pruned_zero(optax.adamw(1e-3), bad_mask).init(params)


def test_update_without_params_is_refused(params, mask):
    tx = keep_pruned_zero(optax.adam(1e-3), mask)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))
