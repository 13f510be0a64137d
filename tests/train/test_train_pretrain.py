"""MLM pre-training pieces: 80/10/10 masking, loss, schedule, sharded steps, save steps, config."""

import importlib.util
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from es_jax.mesh import batch_sharding, global_batch, make_mesh, state_shardings
from es_jax.train import checkpointing, mlm, objectives, pretrain
from es_jax.train.mlm import mask_tokens, mlm_loss

SMOKE = str(Path(__file__).parents[2] / "configs" / "pretrain_smoke.py")
MASK_ID, VOCAB = 4, 1000


@pytest.fixture(scope="module")
def smoke_config():
    """The smoke pre-training config."""
    spec = importlib.util.spec_from_file_location("pretrain_smoke", SMOKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_masking_chooses_15_percent_of_maskable_tokens_and_replaces_80_10_10():
    shape = (400, 500)
    tokens = jax.random.randint(jax.random.key(1), shape, 5, VOCAB)
    maskable = jnp.arange(shape[1])[None, :] % 2 == 0  # odd positions are never masked
    inputs, labels, weights = mask_tokens(jax.random.key(2), tokens, maskable, MASK_ID, VOCAB)
    chosen = np.asarray(weights) > 0
    n = int(np.broadcast_to(maskable, shape).sum())
    assert not chosen[:, 1::2].any()
    assert abs(chosen.sum() / n - 0.15) < 5 * np.sqrt(0.15 * 0.85 / n)
    assert np.array_equal(labels, tokens)
    inputs, tokens = np.asarray(inputs), np.asarray(tokens)
    assert np.array_equal(inputs[~chosen], tokens[~chosen])
    masked = (inputs == MASK_ID)[chosen].mean()
    kept = (inputs == tokens)[chosen].mean()
    randomised = 1 - masked - kept
    k = chosen.sum()
    for observed, expected in ((masked, 0.8), (kept, 0.1 + 0.1 / VOCAB), (randomised, 0.1)):
        assert abs(observed - expected) < 5 * np.sqrt(expected * (1 - expected) / k)


def test_masking_is_a_pure_function_of_its_key():
    tokens = jnp.arange(64).reshape(2, 32) + 5
    maskable = jnp.ones_like(tokens, bool)
    first = mask_tokens(jax.random.key(7), tokens, maskable, MASK_ID, VOCAB)
    again = jax.jit(partial(mask_tokens, mask_token_id=MASK_ID, vocab_size=VOCAB))(
        jax.random.key(7), tokens, maskable
    )
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a, b)


def test_mlm_loss_counts_only_predicted_positions():
    logits = jax.random.normal(jax.random.key(0), (2, 4, 10))
    labels = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    weights = jnp.array([[1.0, 0, 0, 1], [0, 0, 1, 0]])
    loss, metrics = mlm_loss(logits, labels, weights)
    per_token = -jax.nn.log_softmax(logits)[jnp.arange(2)[:, None], jnp.arange(4), labels]
    assert loss == pytest.approx(float((per_token * weights).sum() / 3), rel=1e-6)
    changed = logits.at[0, 1].set(100.0)
    assert mlm_loss(changed, labels, weights)[0] == pytest.approx(float(loss), rel=1e-6)
    assert metrics["predicted_tokens"] == 3


def test_prediction_capacity_bounds_the_chosen_count_per_sequence():
    assert mlm.prediction_capacity(128, 0.15) == 40
    assert mlm.prediction_capacity(8, 0.15) == 8
    assert mlm.prediction_capacity(512, 0.15) == 112
    chosen = jax.random.uniform(jax.random.key(0), (20_000, 128)) < 0.15
    assert float(jnp.mean(chosen.sum(axis=1) > 40)) < 1e-3


@pytest.mark.parametrize("capacity", [6, 2], ids=["predictions-only", "every-position"])
def test_the_head_at_predicted_positions_gives_the_full_heads_loss_and_gradients(
    smoke_config, capacity
):
    model = mlm.build_model(smoke_config, VOCAB)
    model.eval()  # no dropout: both sides see the same hidden states
    seq_len = 16
    tokens = jax.random.randint(jax.random.key(3), (4, seq_len), 5, VOCAB)
    weights = jnp.zeros((4, seq_len)).at[:, jnp.array([1, 5, 6, 11])].set(1.0).at[2, 3].set(0.0)
    assert int(weights.sum(axis=1).max()) <= 6

    def full(model):
        return mlm_loss(model(tokens), tokens, weights)

    def at_predictions(model):
        return mlm.predicted_loss(model, model.bert(tokens, None, None), tokens, weights, capacity)

    (loss, metrics), grads = nnx.value_and_grad(full, has_aux=True)(model)
    (got, got_metrics), got_grads = jax.jit(
        nnx.value_and_grad(at_predictions, has_aux=True)
    )(model)
    assert float(got) == pytest.approx(float(loss), rel=1e-6)
    for key in ("accuracy", "predicted_tokens"):
        assert float(got_metrics[key]) == pytest.approx(float(metrics[key]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_checkpoint_steps_are_interval_log_spaced_and_last():
    steps = checkpointing.checkpoint_steps(total_steps=250, every=100, log_spaced=4)
    assert steps == [0, 1, 5, 22, 100, 200, 250]
    with pytest.raises(ValueError, match="checkpoint_every"):
        checkpointing.checkpoint_steps(100, 0)


def test_learning_rate_warms_up_then_decays_linearly_to_zero(smoke_config):
    schedule = pretrain.learning_rate_schedule(smoke_config)
    peak, warmup, total = (smoke_config.learning_rate, smoke_config.warmup_steps,
                           smoke_config.total_steps)
    assert float(schedule(0)) == 0.0
    assert float(schedule(warmup)) == pytest.approx(peak)
    assert float(schedule(warmup // 2)) == pytest.approx(peak * (warmup // 2) / warmup)
    midway = warmup + (total - warmup) // 2
    assert float(schedule(midway)) == pytest.approx(peak * (total - midway) / (total - warmup))
    assert float(schedule(total)) == pytest.approx(0.0)


def train_two_steps(config, fsdp: int):
    """Two train steps of the smoke model on a fixed batch over all devices, parameters sharded
    over `fsdp` of them."""
    mesh = make_mesh(data=-1, fsdp=fsdp)
    optimizer = pretrain.make_optimizer(config)
    build = partial(mlm.build_model, config, VOCAB)
    graphdef, rest = objectives.split_model(build)

    def init_state():
        params = nnx.state(build(), nnx.Param).to_pure_dict()
        return objectives.init_train_state(params, optimizer, config.seed)

    shardings = state_shardings(jax.eval_shape(init_state), mesh)
    state = jax.jit(init_state, out_shardings=shardings)()
    tokens = np.random.default_rng(0).integers(5, VOCAB, (8, config.data.seq_len), np.int32)
    batch = mlm.with_maskable({"input_ids": tokens, "attention_mask": np.ones_like(tokens)},
                              np.arange(5, dtype=np.int32))
    step_fn = partial(mlm.train_step, graphdef=graphdef, optimizer=optimizer,
                      mask_token_id=MASK_ID, vocab_size=VOCAB, mask_rate=config.mask_rate)
    step = pretrain.compiled_step(step_fn, mesh, shardings)
    sharded = global_batch(batch, batch_sharding(mesh))
    losses = []
    for _ in range(2):
        state, metrics, _ = step(state, sharded, rest, pretrain.healthy())
        losses.append(float(metrics["loss"]))
    return state, losses


def test_replicated_and_fsdp_training_agree_across_eight_devices(smoke_config):
    assert jax.device_count() == 8
    replicated, losses = train_two_steps(smoke_config.copy_and_resolve_references(), fsdp=1)
    sharded, sharded_losses = train_two_steps(smoke_config.copy_and_resolve_references(), 4)
    embedding = sharded["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert not embedding.sharding.is_fully_replicated
    assert losses == pytest.approx(sharded_losses, rel=1e-5)
    assert int(replicated["step"]) == 2
    for a, b in zip(jax.tree.leaves(replicated), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_weights(smoke_config):
    config = smoke_config.copy_and_resolve_references()
    with config.unlocked():
        config.compute_dtype = "bfloat16"
    state, losses = train_two_steps(config, fsdp=1)
    assert all(np.isfinite(losses))
    assert {leaf.dtype for leaf in jax.tree.leaves(state["params"])} == {jnp.dtype("float32")}


def test_decay_spares_biases_and_norms():
    params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "norm": jnp.ones(3)}
    assert pretrain.decays(params) == {"dense": {"kernel": True, "bias": False}, "norm": False}
    optimizer = optax.adamw(0.1, weight_decay=1.0, mask=pretrain.decays)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    assert float(updates["dense"]["bias"][0]) == 0.0
    assert float(updates["dense"]["kernel"][0, 0]) < 0.0


def test_run_only_keys_may_change_but_others_may_not(tmp_path, smoke_config):
    config = smoke_config.copy_and_resolve_references()
    checkpointing.store_config(tmp_path, config, ignore=pretrain.RUN_ONLY_KEYS)
    with config.unlocked():
        config.log_every = 3
        config.mesh.fsdp = 2
        config.data.cache_dir = str(tmp_path / "elsewhere")  # a key inside a group
    checkpointing.check_config(tmp_path, config, force=False, ignore=pretrain.RUN_ONLY_KEYS)
    with config.unlocked():
        config.model.hidden_size = 64
    with pytest.raises(ValueError, match=r"model\.hidden_size: 32 -> 64"):
        checkpointing.check_config(tmp_path, config, force=False, ignore=pretrain.RUN_ONLY_KEYS)
    checkpointing.check_config(tmp_path, config, force=True, ignore=pretrain.RUN_ONLY_KEYS)
    stored = json.loads((tmp_path / checkpointing.CONFIG_FILE).read_text())
    assert stored["model"]["hidden_size"] == 32  # checking never writes


def test_divergence_is_the_first_step_whose_loss_gradient_or_parameters_are_not_finite():
    health = pretrain.healthy()
    for step, loss, grad_norm, params_finite in ((1, 6.0, 1.0, True), (2, 8e11, jnp.nan, False),
                                                 (3, jnp.nan, jnp.nan, False)):
        health = pretrain.track_divergence(health, jnp.int32(step), jnp.float32(loss),
                                           jnp.float32(grad_norm), jnp.bool_(params_finite))
    assert int(health["step"]) == 2
    assert float(health["loss"]) == pytest.approx(8e11)
    assert not bool(health["params_finite"])
    pretrain.check_divergence(jax.device_get(pretrain.healthy()), last_saved=1, checkpoints="c")
    with pytest.raises(ValueError, match=r"step 2: the gradient norm and the parameters became "
                                         r"non-finite .*newest checkpoint is step 1 in c"):
        pretrain.check_divergence(jax.device_get(health), last_saved=1, checkpoints="c")


def test_resuming_from_non_finite_parameters_is_refused_naming_the_checkpoint():
    pretrain.refuse_non_finite({"w": jnp.ones(3)}, Path("checkpoints/3"))
    with pytest.raises(ValueError, match=r"checkpoints/3 holds NaN or inf parameters"):
        pretrain.refuse_non_finite({"w": jnp.array([1.0, jnp.inf])}, Path("checkpoints/3"))


def test_a_record_logged_after_a_line_cut_short_starts_a_line_of_its_own(tmp_path):
    from es_jax.analysis.plots import training_records

    log = tmp_path / pretrain.LOG_FILE
    log.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')
    pretrain.write_log(tmp_path, {"step": 3, "loss": 4.0})
    assert log.read_text().splitlines()[-1] == '{"step": 3, "loss": 4.0}'
    with pytest.warns(UserWarning, match="line 2"):
        assert [r["step"] for r in training_records(log)] == [1, 3]
