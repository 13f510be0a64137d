"""keep_pruned_zero: pruned weights and their Adam moments stay exactly zero, whatever is chained
inside the wrapper or after it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from es_jax import pruning
from es_jax.train import keep_pruned_zero

STEPS = 10


def random_grads(params, step):
    """Gaussian gradients of the parameters' structure, seeded by step."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(step), len(leaves))
    grads = [
        jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, grads)


def train(tx, params, steps=STEPS, grads_mask=None):
    """`steps` updates of `tx` on random gradients, jitted; returns params and state.

    With `grads_mask`, the gradients of the entries it prunes are 0 (an unmasked reference run).
    """
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(steps):
        grads = random_grads(params, step)
        if grads_mask is not None:
            grads = pruning.apply(grads, grads_mask)
        updates, state = update(grads, state, params)
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


def all_moments(state):
    """The first and second moments of every Adam in an optimizer state."""
    return [
        moment
        for name in ("mu", "nu")
        for _, moment in optax.tree_utils.tree_get_all_with_path(state, name)
    ]


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


def test_pruned_weights_that_are_not_zero_are_refused_with_the_leaf_named(params, mask):
    tx = keep_pruned_zero(optax.adamw(1e-3, weight_decay=0.01), mask)
    with pytest.raises(ValueError, match=r"'dense/kernel': \d+ pruned weights are not zero"):
        tx.init(params)
    tx.init(pruning.apply(params, mask))


def test_pruned_updates_are_exactly_zero_and_ignore_the_pruned_weights(params, mask):
    tx = keep_pruned_zero(optax.adamw(1e-2, weight_decay=0.1), mask)
    state = tx.init(pruning.apply(params, mask))
    # Weights that are not zero where pruned: weight decay gives them updates, which must not pass.
    updates, _ = tx.update(random_grads(params, 0), state, params)
    assert (pruned_entries(updates, mask) == 0).all()
    assert (kept_entries(updates, mask) != 0).all()


def test_off_target_and_kept_weights_train_like_plain_adamw(params, mask):
    inner = optax.adamw(1e-2, weight_decay=0.1)
    masked, _ = train(keep_pruned_zero(inner, mask), pruning.apply(params, mask))
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
    tx = keep_pruned_zero(optax.adamw(1e-2, weight_decay=0.1), mask)
    trained, state = train(tx, pruning.apply(params, mask))
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
        start = pruning.apply(params, level_mask)
        state = keep_pruned_zero(inner, level_mask).init(start)
        updates, _ = update(random_grads(params, 0), state, start)
        moved = optax.apply_updates(start, updates)
        assert (pruned_entries(moved, level_mask) == 0).all()
        assert (kept_entries(moved, level_mask) != kept_entries(start, level_mask)).all()
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


def test_update_needs_params_only_when_inner_does(params, mask):
    start = pruning.apply(params, mask)
    tx = keep_pruned_zero(optax.adam(1e-3), mask)
    state = tx.init(start)
    grads = random_grads(params, 0)
    without, _ = tx.update(grads, state)
    with_params, _ = tx.update(grads, state, start)
    jax.tree.map(np.testing.assert_array_equal, without, with_params)
    decaying = keep_pruned_zero(optax.adamw(1e-3, weight_decay=0.1), mask)
    with pytest.raises(ValueError, match="params"):
        decaying.update(grads, decaying.init(start))


# Links chained after the wrapper: each maps a zero update at a zero weight to zero. The clip
# threshold, 1e-3, is below the global norm of the wrapped Adam's updates (6.4e-3 to 1.9e-3 over
# the 10 steps), so it clips on every step.
LATER_LINKS = {
    "add_decayed_weights": [optax.add_decayed_weights(1e-2)],
    "scale_by_learning_rate": [optax.scale_by_learning_rate(1e-2)],
    "clip_by_global_norm": [optax.clip_by_global_norm(1e-3)],
    "adam": [optax.adam(1e-2)],
    "all four": [
        optax.add_decayed_weights(1e-2),
        optax.clip_by_global_norm(1e-3),
        optax.scale_by_learning_rate(1e-2),
        optax.adam(1e-2),
    ],
}


@pytest.mark.parametrize("later", LATER_LINKS.values(), ids=LATER_LINKS.keys())
def test_links_chained_after_keep_pruned_weights_and_moments_zero(params, mask, later):
    start = pruning.apply(params, mask)
    tx = optax.chain(keep_pruned_zero(optax.adam(1e-3), mask), *later)
    trained, state = train(tx, start)
    assert (pruned_entries(trained, mask) == 0).all()
    assert (kept_entries(trained, mask) != kept_entries(start, mask)).all()
    for moment in all_moments(state):
        assert (pruned_entries(moment, mask) == 0).all()
        assert (kept_entries(moment, mask) != 0).all()


@pytest.mark.parametrize("later", LATER_LINKS.values(), ids=LATER_LINKS.keys())
def test_links_chained_after_train_like_an_unmasked_chain_on_pruned_gradients(
    params, mask, later
):
    start = pruning.apply(params, mask)
    masked, _ = train(optax.chain(keep_pruned_zero(optax.adam(1e-3), mask), *later), start)
    reference, _ = train(optax.chain(optax.adam(1e-3), *later), start, grads_mask=mask)
    # Equal up to float rounding: XLA fuses the masked update differently.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), masked, reference)


# Links that act entry by entry, so pruned gradients cannot reach a kept weight through them (a
# global-norm clip would see them).
ELEMENTWISE = ("add_decayed_weights", "scale_by_learning_rate", "adam")


@pytest.mark.parametrize("later", [LATER_LINKS[name] for name in ELEMENTWISE], ids=ELEMENTWISE)
def test_elementwise_links_after_train_kept_weights_like_plain_unmasked_training(
    params, mask, later
):
    masked, _ = train(
        optax.chain(keep_pruned_zero(optax.adam(1e-3), mask), *later), pruning.apply(params, mask)
    )
    plain, _ = train(optax.chain(optax.adam(1e-3), *later), params)
    np.testing.assert_allclose(kept_entries(masked, mask), kept_entries(plain, mask), rtol=1e-6)
    np.testing.assert_allclose(masked["dense"]["bias"], plain["dense"]["bias"], rtol=1e-6)


def test_whatever_inner_adds_to_pruned_entries_never_reaches_the_weights(params, mask):
    noisy = optax.chain(optax.add_noise(1.0, 0.0, key=jax.random.key(2)), optax.adamw(1e-2))
    start = pruning.apply(params, mask)
    trained, state = train(optax.chain(keep_pruned_zero(noisy, mask), optax.adam(1e-2)), start)
    assert (pruned_entries(trained, mask) == 0).all()
    assert (kept_entries(trained, mask) != kept_entries(start, mask)).all()
    _, later_adam_state = state
    for moment in all_moments(later_adam_state):
        assert (pruned_entries(moment, mask) == 0).all()
