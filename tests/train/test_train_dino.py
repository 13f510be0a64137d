"""DINO's pieces against numpy references on tiny tensors: the loss and its gradients, the
centre, the EMA teacher, the schedules, the head and the ViT with the head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special

from es_jax import models, pruning
from es_jax.models import vit
from es_jax.train import dino

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
TINY_VIT = vit.ViTConfig(
    **{
        **{k: v for k, v in models.TINY_HF_CONFIGS["vit"].items() if k != "model_type"},
        "num_attention_heads": 4,
        "image_size": 16,
        "patch_size": 4,
        "num_channels": 1,
    }
)


def _log_softmax(x):
    """Row-wise log-softmax in float64."""
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _numpy_dino_loss(student, teacher, center):
    """DINOLoss written out: every teacher view against every other student view."""
    targets = np.exp(_log_softmax((teacher - center) / TEACHER_TEMP))
    log_probs = _log_softmax(student / STUDENT_TEMP)
    terms = [
        np.mean(np.sum(-targets[t] * log_probs[s], axis=-1))
        for t in range(teacher.shape[0])
        for s in range(student.shape[0])
        if s != t
    ]
    return np.mean(terms)


@pytest.fixture(scope="module")
def views():
    """Student (S=4, B=2, K=4), teacher (T=2, B=2, K=4) logits and a centre (K=4), float64."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(4, 2, 4)), rng.normal(size=(2, 2, 4)), rng.normal(size=4) * 0.1


def _f32(*arrays):
    """numpy arrays as float32 jax arrays."""
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def test_loss_matches_numpy_dino_loss(views):
    loss = dino.dino_loss(*_f32(*views), STUDENT_TEMP, TEACHER_TEMP)
    assert loss.shape == ()
    np.testing.assert_allclose(loss, _numpy_dino_loss(*views), rtol=1e-5)


def test_loss_of_uniform_teacher_and_student_is_log_k():
    student, teacher = jnp.zeros((3, 2, 4)), jnp.full((2, 2, 4), 5.0)
    loss = dino.dino_loss(student, teacher, jnp.zeros(4), STUDENT_TEMP, TEACHER_TEMP)
    np.testing.assert_allclose(loss, np.log(4.0), rtol=1e-6)


def test_gradient_flows_only_to_the_student(views):
    student, teacher, center = views
    grads = jax.grad(dino.dino_loss, argnums=(0, 1, 2))(
        *_f32(student, teacher, center), STUDENT_TEMP, TEACHER_TEMP
    )
    np.testing.assert_array_equal(grads[1], 0.0)
    np.testing.assert_array_equal(grads[2], 0.0)
    # d loss / d student_s = sum over t != s of (softmax(student_s / tau) - q_t) / (tau B pairs).
    targets = np.exp(_log_softmax((teacher - center) / TEACHER_TEMP))
    probs = np.exp(_log_softmax(student / STUDENT_TEMP))
    pairs, batch = 2 * 3, 2
    expected = np.zeros_like(student)
    for t in range(2):
        for s in range(4):
            if s != t:
                expected[s] += (probs[s] - targets[t]) / (STUDENT_TEMP * batch * pairs)
    np.testing.assert_allclose(grads[0], expected, atol=1e-5)


@pytest.mark.parametrize(
    ("student", "teacher", "center"),
    [((4, 2, 4), (2, 2, 3), (4,)), ((1, 2, 4), (1, 2, 4), (4,)), ((2, 2, 4), (3, 2, 4), (4,)),
     ((4, 2, 4), (2, 2, 4), (1, 4)), ((8, 4), (2, 4), (4,))],
)
def test_loss_refuses_mismatched_views(student, teacher, center):
    with pytest.raises(ValueError, match=r"student \(S, B, K\)"):
        dino.dino_loss(jnp.zeros(student), jnp.zeros(teacher), jnp.zeros(center), 0.1, 0.04)


def test_center_moves_towards_the_mean_teacher_output(views):
    _, teacher, center = views
    new = dino.update_center(*_f32(center, teacher), 0.9)
    expected = 0.9 * center + 0.1 * teacher.reshape(-1, 4).mean(axis=0)
    np.testing.assert_allclose(new, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="center"):
        dino.update_center(jnp.zeros(3), jnp.zeros((2, 2, 4)), 0.9)


def test_ema_update_is_leafwise_and_keeps_dtypes():
    teacher = {"a": jnp.asarray([1.0, 2.0]), "b": [jnp.asarray([[4.0]], jnp.bfloat16)]}
    student = {"a": jnp.asarray([3.0, 0.0]), "b": [jnp.asarray([[0.0]], jnp.bfloat16)]}
    new = jax.jit(dino.ema_update)(teacher, student, 0.75)
    np.testing.assert_allclose(new["a"], [1.5, 1.5])
    np.testing.assert_array_equal(np.asarray(new["b"][0], np.float32), [[3.0]])
    assert new["b"][0].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="same tree structure"):
        dino.ema_update(teacher, {"a": student["a"]}, 0.75)


def test_teacher_momentum_follows_the_cosine_from_base_to_one():
    momentum = jax.jit(dino.teacher_momentum, static_argnums=1)
    steps = jnp.asarray([0, 25, 50, 100, 150])
    expected = [0.996, 1 - 0.004 * (1 + np.cos(np.pi / 4)) / 2, 0.998, 1.0, 1.0]
    np.testing.assert_allclose(momentum(steps, 100), expected, rtol=1e-7)
    with pytest.raises(ValueError, match="total_steps"):
        dino.teacher_momentum(0, 0)


def test_teacher_temperature_warms_up_linearly_then_stays():
    temperature = jax.jit(dino.teacher_temperature, static_argnums=1)
    steps = jnp.asarray([0, 5, 10, 30])
    np.testing.assert_allclose(
        temperature(steps, 10, 0.04, 0.07), [0.04, 0.055, 0.07, 0.07], rtol=1e-6
    )
    np.testing.assert_allclose(dino.teacher_temperature(3, 0, 0.04, 0.07), 0.07, rtol=1e-7)
    np.testing.assert_allclose(dino.teacher_temperature(3, 10), 0.04, rtol=1e-7)
    with pytest.raises(ValueError, match="warmup_steps"):
        dino.teacher_temperature(0, -1)


def _numpy_head(head, x):
    """DINOHead's forward pass in float64 from the head's parameters."""
    def dense(layer, h):
        return h @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...])

    def gelu(h):
        return 0.5 * h * (1 + special.erf(h / np.sqrt(2)))

    h = dense(head.fc3, gelu(dense(head.fc2, gelu(dense(head.fc1, x)))))
    h = h / np.linalg.norm(h, axis=-1, keepdims=True)
    v = np.asarray(head.last_layer.kernel[...], np.float64)
    return h @ (v / np.linalg.norm(v, axis=0, keepdims=True))


def test_head_matches_numpy_and_its_last_layer_has_unit_columns():
    head = dino.DinoHead(6, 10, hidden_dim=16, bottleneck_dim=5, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).normal(size=(3, 6))
    out = head(jnp.asarray(x, jnp.float32))
    assert out.shape == (3, 10)
    np.testing.assert_allclose(out, _numpy_head(head, x), atol=1e-5)
    norms = np.linalg.norm(np.asarray(head.last_layer.normalized_kernel()), axis=0)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
    assert np.all(np.abs(np.asarray(out)) <= 1.0 + 1e-6)  # unit vector . unit column


def test_dino_model_takes_global_and_local_crops_with_a_classifier_s_vit_tree():
    model = dino.DinoModel(TINY_VIT, 12, hidden_dim=16, bottleneck_dim=8, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, x: m(x))
    images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 1)), jnp.float32)
    assert forward(model, images).shape == (2, 12)
    assert forward(model, images[:, 4:12, 4:12]).shape == (2, 12)
    classifier = vit.ViTForImageClassification(TINY_VIT, 10, rngs=nnx.Rngs(0))

    def vit_shapes(module):
        params = nnx.state(module.vit, nnx.Param)
        return dict(zip(pruning.leaf_paths(params), [a.shape for a in jax.tree.leaves(params)],
                        strict=True))

    assert vit_shapes(model) == vit_shapes(classifier)
