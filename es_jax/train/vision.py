"""Vision pre-training of a ViT on images: supervised, or DINO-style self-distillation.

Two `Objective`s for `es_jax.train.pretrain`'s loop, over the same backbone (`vit_config`), the
same optimizer (AdamW with warm-up and linear decay, `pretrain.make_optimizer`) and the same number
of images a step (`config.global_batch_size`):

- "supervised": `ViTForImageClassification`, cross-entropy on the labels of one augmented view
  (random resized crop and flip) per image. The checkpoint's "params" are the classifier's:
  {"vit": backbone, "classifier": ...}.
- "dino": Caron et al. (2021) without labels: a student and a teacher `DinoModel` (backbone and
  projection head); two global and `config.data.local_crops` local crops per image (made in the
  grain pipeline, `es_jax.data.images.multi_crop`); the teacher sees the global crops only and its
  outputs are centred and sharpened (`config.dino.teacher_temp`, warmed up from
  `warmup_teacher_temp`); the student's cross-entropy against them over every pair of different
  views is the loss; the teacher follows the student by an exponential moving average whose
  momentum rises from `momentum_teacher` to 1 on a cosine over the run; the centre by momentum
  `center_momentum`. The checkpoint's "params" are the teacher's ({"vit": backbone, "head": ...}):
  DINO's own evaluations and released weights are the teacher's. The student's parameters, on
  which the optimizer works, are kept as "student", the centre as "center". Left out at this
  scale: DINO's freezing of the last layer during the first epoch and its weight-decay schedule.

Both report the quality of their backbone at the end (`quality`): DINO's weighted k-NN accuracy
(k = `config.evaluation.k`, temperature `config.evaluation.temperature`) of the final [CLS]
hidden state, the first `bank_examples` training images as the bank, the first `test_examples`
test images as queries, no augmentation.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from es_jax.train import objectives


def vit_config(config: ml_collections.ConfigDict):
    """The `ViTConfig` of a vision pre-training config's backbone (`config.model`)."""
    from es_jax.models import vit

    model = config.model
    return vit.ViTConfig(
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        intermediate_size=model.intermediate_size,
        image_size=model.image_size,
        patch_size=model.patch_size,
        num_channels=model.num_channels,
        hidden_dropout_prob=model.dropout,
        attention_probs_dropout_prob=model.dropout,
        dtype=jnp.dtype(config.compute_dtype),
    )


def build_model(config: ml_collections.ConfigDict) -> nnx.Module:
    """The freshly initialised model of the objective, seeded by `config.seed`: a classifier
    (supervised) or a `DinoModel` (dino)."""
    from es_jax.models import vit
    from es_jax.train import dino

    rngs = nnx.Rngs(params=config.seed, dropout=config.seed + 1)
    if objectives.objective_name(config) == "supervised":
        return vit.ViTForImageClassification(
            vit_config(config), config.data.num_classes, rngs=rngs
        )
    head = config.dino
    return dino.DinoModel(
        vit_config(config), head.out_dim, head.hidden_dim, head.bottleneck_dim, rngs=rngs
    )


# ----------------------------------------------------------------------------- supervised


def supervised_step(
    state: dict[str, Any],
    batch: dict[str, jax.Array],
    rest: nnx.State,
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One AdamW step on the mean cross-entropy of a batch of labelled views; the dropout key
    comes from (rng, step)."""
    (dropout_key,) = objectives.step_keys(state, 1)
    model = objectives.training_model(graphdef, state["params"], rest, dropout_key)

    def loss_fn(model: nnx.Module) -> tuple[jax.Array, dict]:
        logits = model(batch["pixel_values"]).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        return loss, {"loss": loss, "accuracy": accuracy}

    (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    new_state, grad_norm = objectives.optimizer_step(state, grads, optimizer)
    return new_state, {**metrics, "grad_norm": grad_norm}


# ----------------------------------------------------------------------------- DINO


class DinoSchedule(NamedTuple):
    """DINO's temperatures and momenta over a run of `total_steps`."""

    total_steps: int
    student_temp: float
    teacher_temp: float
    warmup_teacher_temp: float
    teacher_temp_warmup_steps: int
    center_momentum: float
    momentum_teacher: float


def dino_schedule(config: ml_collections.ConfigDict) -> DinoSchedule:
    """The DINO settings of a config (`config.dino`) over its `total_steps`."""
    d = config.dino
    return DinoSchedule(
        config.total_steps, d.student_temp, d.teacher_temp, d.warmup_teacher_temp,
        d.teacher_temp_warmup_steps, d.center_momentum, d.momentum_teacher,
    )


def views_first(crops: jax.Array) -> jax.Array:
    """(B, V, H, W, C) crops -> (V * B, H, W, C), view-major (all of view 0, then view 1, ...)."""
    return jnp.swapaxes(crops, 0, 1).reshape(-1, *crops.shape[2:])


def dino_step(
    state: dict[str, Any],
    batch: dict[str, jax.Array],
    rest: nnx.State,
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    schedule: DinoSchedule,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One DINO step: the student's AdamW step on the loss against the centred, sharpened
    teacher; then the teacher's EMA update and the centre's update."""
    from es_jax.train import dino

    (dropout_key,) = objectives.step_keys(state, 1)
    batch_size = batch["global"].shape[0]
    global_views, local_views = views_first(batch["global"]), views_first(batch["local"])
    teacher = nnx.merge(graphdef, state["params"], rest)
    teacher.eval()
    teacher_out = jax.lax.stop_gradient(teacher(global_views)).astype(jnp.float32)
    teacher_out = teacher_out.reshape(-1, batch_size, teacher_out.shape[-1])
    teacher_temp = dino.teacher_temperature(
        state["step"], schedule.teacher_temp_warmup_steps, schedule.warmup_teacher_temp,
        schedule.teacher_temp,
    )
    student = objectives.training_model(graphdef, state["student"], rest, dropout_key)

    def loss_fn(student: nnx.Module) -> jax.Array:
        outputs = jnp.concatenate([student(global_views), student(local_views)]).astype(
            jnp.float32
        )
        outputs = outputs.reshape(-1, batch_size, outputs.shape[-1])
        return dino.dino_loss(
            outputs, teacher_out, state["center"], schedule.student_temp, teacher_temp
        )

    loss, grads = nnx.value_and_grad(loss_fn)(student)
    stepped, grad_norm = objectives.optimizer_step(state, grads, optimizer, trained="student")
    momentum = dino.teacher_momentum(
        state["step"], schedule.total_steps, schedule.momentum_teacher
    )
    new_state = {
        **stepped,
        "params": dino.ema_update(state["params"], stepped["student"], momentum),
        "center": dino.update_center(state["center"], teacher_out, schedule.center_momentum),
    }
    metrics = {"loss": loss, "teacher_momentum": momentum, "teacher_temp": teacher_temp,
               "teacher_entropy": _mean_entropy(teacher_out, state["center"], teacher_temp)}
    return new_state, {**metrics, "grad_norm": grad_norm}


def _mean_entropy(teacher_out: jax.Array, center: jax.Array, temperature: jax.Array) -> jax.Array:
    """Mean entropy of the teacher's targets: near log(out_dim) when they are uniform (collapse
    to the centre), near 0 when one unit takes every image (collapse to a point)."""
    log_probs = jax.nn.log_softmax((teacher_out - center) / temperature, axis=-1)
    return -(jnp.exp(log_probs) * log_probs).sum(-1).mean()


# ----------------------------------------------------------------------------- quality


def knn_quality(config: ml_collections.ConfigDict, state: dict[str, Any]) -> dict[str, float]:
    """{"knn_accuracy": percent, "knn_bank", "knn_test"} of the run's backbone (see the module
    docstring), through the sweep's k-NN evaluator (`evaluators.knn_classification`)."""
    from es_jax.data import images as image_data
    from es_jax.evaluate import evaluators
    from es_jax.models import vit

    evaluation, data = config.evaluation, config.data
    bank = _first(image_data.image_arrays(data.dataset, "train", data.data_dir or None),
                  evaluation.bank_examples)
    test = _first(image_data.image_arrays(data.dataset, "test", data.data_dir or None),
                  evaluation.test_examples)
    size = config.model.image_size
    backbone = vit.ViTModel(vit_config(config), add_pooling_layer=False, rngs=nnx.Rngs(0))
    evaluator = evaluators.knn_classification(
        backbone,
        image_data.evaluation_batches(bank, evaluation.batch_size, size),
        image_data.evaluation_batches(test, evaluation.batch_size, size),
        num_classes=data.num_classes, k=evaluation.k, temperature=evaluation.temperature,
        task="knn",
    )
    return {"knn_accuracy": evaluator(state["params"]["vit"]), "knn_bank": len(bank.labels),
            "knn_test": len(test.labels)}


def _first(images: Any, count: int) -> Any:
    """The first `count` images of an ImageSet (all of them when count <= 0)."""
    if count <= 0:
        return images
    return type(images)(images.images[:count], images.labels[:count])


# ----------------------------------------------------------------------------- the objective


def objective(
    config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation
) -> objectives.Objective:
    """The supervised or DINO objective of a vision pre-training config."""
    from es_jax.data import images as image_data

    name = objectives.objective_name(config)
    build = partial(build_model, config)
    graphdef, rest = objectives.split_model(build)
    data = config.data
    train_images = image_data.image_arrays(data.dataset, "train", data.data_dir or None)
    per_host = config.global_batch_size // jax.process_count()
    shard = {"shard_index": jax.process_index(), "shard_count": jax.process_count()}
    if name == "supervised":
        step = partial(supervised_step, graphdef=graphdef, optimizer=optimizer)
        dataset = image_data.pretraining_dataset(
            train_images, "supervised", per_host, seed=data.seed,
            image_size=config.model.image_size, **shard,
        )

        def init_state() -> dict[str, Any]:
            params = nnx.state(build(), nnx.Param).to_pure_dict()
            return objectives.init_train_state(params, optimizer, config.seed)

    else:
        step = partial(dino_step, graphdef=graphdef, optimizer=optimizer,
                       schedule=dino_schedule(config))
        crops = image_data.MultiCrop(
            global_size=config.model.image_size, global_scale=tuple(data.global_scale),
            local_crops=data.local_crops, local_size=data.local_size,
            local_scale=tuple(data.local_scale),
        )
        dataset = image_data.pretraining_dataset(
            train_images, "multicrop", per_host, seed=data.seed, crops=crops, **shard
        )

        def init_state() -> dict[str, Any]:
            student = nnx.state(build(), nnx.Param).to_pure_dict()
            teacher = jax.tree.map(jnp.copy, student)
            center = jnp.zeros((config.dino.out_dim,), jnp.float32)
            state = objectives.init_train_state(student, optimizer, config.seed)
            return {**state, "params": teacher, "student": student, "center": center}

    return objectives.Objective(
        init_state=init_state,
        step=step,
        rest=rest,
        dataset=dataset,
        host_batch=dict,
        quality=partial(knn_quality, config),
    )
