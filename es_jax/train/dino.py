"""DINO's pieces (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"):
the projection head, a ViT with that head, the cross-view loss, the teacher's centre, its EMA
weights and the schedules of its momentum and temperature.

The training loop that combines them lives elsewhere; everything here is a pure function of arrays
(jit-able, steps may be traced) or an NNX module. Views are stacked on a leading axis: the student
sees S views (its first T are the teacher's T global crops), the teacher T, each a (B, K) batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from es_jax.models import layers, vit

INIT_STDDEV = 0.02

PyTree = Any


class DinoHead(nnx.Module):
    """DINO's projection head: MLP in_dim -> hidden -> hidden -> bottleneck (GELU between), L2
    normalisation, then a bias-free linear layer to `out_dim` whose every output unit's weight
    vector (a column of the (bottleneck, out) kernel) is normalised to unit length (DINO's weight
    norm with norm_last_layer=True: the gain fixed to 1, only the direction learned)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        *,
        rngs: nnx.Rngs,
    ):
        self.fc1 = layers.linear(in_dim, hidden_dim, init_stddev=INIT_STDDEV, rngs=rngs)
        self.fc2 = layers.linear(hidden_dim, hidden_dim, init_stddev=INIT_STDDEV, rngs=rngs)
        self.fc3 = layers.linear(hidden_dim, bottleneck_dim, init_stddev=INIT_STDDEV, rngs=rngs)
        self.last_layer = UnitNormLinear(bottleneck_dim, out_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in_dim) -> (..., out_dim) logits."""
        x = layers.gelu_exact(self.fc1(x))
        x = layers.gelu_exact(self.fc2(x))
        return self.last_layer(l2_normalize(self.fc3(x)))


class DinoModel(nnx.Module):
    """A ViT backbone (`vit`, parameters laid out as `ViTForImageClassification.vit`) and a
    `DinoHead` (`head`) on its final [CLS] hidden state."""

    def __init__(
        self,
        vit_config: vit.ViTConfig,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        *,
        rngs: nnx.Rngs,
    ):
        self.vit = vit.ViTModel(vit_config, add_pooling_layer=False, rngs=rngs)
        self.head = DinoHead(vit_config.hidden_size, out_dim, hidden_dim, bottleneck_dim, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """(B, H, W, C) images, H and W any multiples of the patch size -> (B, out_dim) logits."""
        return self.head(self.vit(pixel_values, interpolate_pos_encoding=True)[:, 0])


class UnitNormLinear(nnx.Module):
    """A bias-free linear layer `x @ (v / ||v||)` whose learned `kernel` v (in, out) is used with
    each column scaled to unit L2 norm."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        init = layers.normal_init(INIT_STDDEV)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), jnp.float32))

    def normalized_kernel(self) -> jax.Array:
        """The kernel used: every column of `kernel` divided by its L2 norm."""
        kernel = self.kernel[...]
        return kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in) -> (..., out)."""
        return jnp.matmul(x, self.normalized_kernel(), precision=jax.lax.Precision.HIGHEST)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`x / max(||x||, eps)` along the last axis (torch's F.normalize, as DINO uses)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def dino_loss(
    student: jax.Array,
    teacher: jax.Array,
    center: jax.Array,
    student_temp: float,
    teacher_temp: float | jax.Array,
) -> jax.Array:
    """DINO's cross-view loss (DINOLoss), a float32 scalar.

    student (S, B, K) and teacher (T, B, K) are logits of S and T views, the student's views
    0..T-1 being the teacher's T views. Teacher targets q_t = softmax((teacher_t - center) /
    teacher_temp) under stop_gradient; for every pair (t, s) with s != t the term is the batch
    mean of sum_k -q_t * log_softmax(student_s / student_temp); the loss is the mean of the
    T * (S - 1) terms.
    """
    check_views(student, teacher, center)
    student = student.astype(jnp.float32)
    teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    center = jax.lax.stop_gradient(center.astype(jnp.float32))
    targets = jax.nn.softmax((teacher - center) / teacher_temp, axis=-1)
    log_probs = jax.nn.log_softmax(student / student_temp, axis=-1)
    cross = -jnp.einsum("tbk,sbk->ts", targets, log_probs, precision=jax.lax.Precision.HIGHEST)
    views_t, views_s, batch = teacher.shape[0], student.shape[0], student.shape[1]
    other = jnp.arange(views_t)[:, None] != jnp.arange(views_s)[None, :]
    return jnp.sum(jnp.where(other, cross, 0.0)) / (batch * views_t * (views_s - 1))


def check_views(student: jax.Array, teacher: jax.Array, center: jax.Array) -> None:
    """Raises a ValueError unless student is (S, B, K), teacher (T, B, K) with 1 <= T <= S and
    S >= 2, and center (K,)."""
    if (
        student.ndim != 3
        or teacher.ndim != 3
        or student.shape[1:] != teacher.shape[1:]
        or not 1 <= teacher.shape[0] <= student.shape[0]
        or student.shape[0] < 2
        or center.shape != student.shape[-1:]
    ):
        raise ValueError(
            f"dino_loss needs student (S, B, K), teacher (T, B, K) with 1 <= T <= S, S >= 2, and "
            f"center (K,); got student {student.shape}, teacher {teacher.shape}, center "
            f"{center.shape}. Stack the views on axis 0, the teacher's global crops first."
        )


def update_center(center: jax.Array, teacher: jax.Array, momentum: float | jax.Array) -> jax.Array:
    """center * momentum + (1 - momentum) * the mean of teacher (..., K) over all leading axes
    (views and batch), under stop_gradient."""
    if teacher.ndim < 2 or center.shape != teacher.shape[-1:]:
        raise ValueError(
            f"update_center needs teacher (T, B, K) and center (K,); got teacher {teacher.shape}, "
            f"center {center.shape}."
        )
    batch_center = jnp.mean(teacher.astype(jnp.float32), axis=tuple(range(teacher.ndim - 1)))
    new = center * momentum + (1.0 - momentum) * batch_center
    return jax.lax.stop_gradient(new.astype(center.dtype))


def ema_update(
    teacher_params: PyTree, student_params: PyTree, momentum: float | jax.Array
) -> PyTree:
    """teacher * momentum + (1 - momentum) * student, leaf by leaf, each in the teacher leaf's
    dtype; the two pytrees must have the same structure."""
    if jax.tree.structure(teacher_params) != jax.tree.structure(student_params):
        raise ValueError(
            "ema_update needs teacher and student parameters of the same tree structure; got "
            f"{jax.tree.structure(teacher_params)} and {jax.tree.structure(student_params)}."
        )
    return jax.tree.map(
        lambda t, s: (t * momentum + (1.0 - momentum) * s).astype(t.dtype),
        teacher_params,
        student_params,
    )


def teacher_momentum(step: int | jax.Array, total_steps: int, base: float = 0.996) -> jax.Array:
    """DINO's cosine schedule: 1 - (1 - base) * (1 + cos(pi * step / total_steps)) / 2, i.e.
    `base` at step 0 rising to 1.0 at `total_steps` (and after); float32, `step` may be traced."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}.")
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
    return 1.0 - (1.0 - base) * (1.0 + jnp.cos(jnp.pi * progress)) / 2.0


def teacher_temperature(
    step: int | jax.Array, warmup_steps: int, start: float = 0.04, end: float = 0.04
) -> jax.Array:
    """start + (end - start) * min(step / warmup_steps, 1): linear from `start` at step 0 to `end`
    at `warmup_steps`, then `end` (`end` throughout when warmup_steps is 0); float32, `step` may
    be traced."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be at least 0, got {warmup_steps}.")
    if warmup_steps == 0:
        return jnp.asarray(end, jnp.float32)
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
    return start + (end - start) * progress
