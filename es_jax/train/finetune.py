"""Masked fine-tuning: AdamW with linear decay, the pruned weights held at exactly zero.

`finetune(model_fn, params_mask, train_ds, config, seed)` depends only on its arguments: the
model (pre-trained weights and a freshly initialised head) comes from `model_fn(nnx.Rngs(seed))`,
the batches from iterating `train_ds` from its start, so every sparsity level of a sweep gets the
same head initialisation, dropout stream and data order; only the mask differs. The train step
is jitted at module level with the mask in the optimizer state, so it compiles once for all
levels of one model and config.

On a device mesh (`mesh=`, `es_jax.mesh`), the parameters, optimizer state and mask are sharded by
`mesh.state_shardings` (FSDP along `fsdp`, or replicated), each batch is split along its rows
over every device, and the step is jitted with those shardings; its values equal those of the
run on one device up to float rounding (the batch sums are reduced in another order).
"""

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from es_jax import pruning
from es_jax.mesh import batch_sharding, global_batch, replicated, shard, state_shardings
from es_jax.train.masked import keep_pruned_zero

PyTree = Any

# The paper's Table 1 (PAPER.md section 4.4): epochs, batch size, learning rate per task. The LR
# decays linearly to 0; Adam eps is 1e-8 for NLP and 2e-8 for vision; weight decay 0.
PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    "mnli": {"num_epochs": 3, "batch_size": 32, "learning_rate": 2e-5, "adam_eps": 1e-8},
    "qnli": {"num_epochs": 4, "batch_size": 32, "learning_rate": 2e-5, "adam_eps": 1e-8},
    "qqp": {"num_epochs": 3, "batch_size": 32, "learning_rate": 2e-5, "adam_eps": 1e-8},
    "rte": {"num_epochs": 3, "batch_size": 32, "learning_rate": 2e-5, "adam_eps": 1e-8},
    "sst2": {"num_epochs": 5, "batch_size": 32, "learning_rate": 2e-5, "adam_eps": 1e-8},
    "squad": {"num_epochs": 3, "batch_size": 16, "learning_rate": 3e-5, "adam_eps": 1e-8},
    "cifar10": {"num_epochs": 8, "batch_size": 64, "learning_rate": 2e-5, "adam_eps": 2e-8},
    "cifar100": {"num_epochs": 8, "batch_size": 64, "learning_rate": 2e-5, "adam_eps": 2e-8},
    "fashion_mnist": {"num_epochs": 8, "batch_size": 64, "learning_rate": 2e-5, "adam_eps": 2e-8},
    "tiny_imagenet": {"num_epochs": 5, "batch_size": 64, "learning_rate": 2e-5, "adam_eps": 2e-8},
}
OBJECTIVES = ("classification", "qa")
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Optimiser and loop settings (hashable: it is a static argument of the train step)."""

    objective: str = "classification"
    learning_rate: float = 2e-5
    num_epochs: int = 3
    batch_size: int = 32
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None
    total_steps: int | None = None


def finetune_config(task: str | None = None, **overrides: Any) -> FinetuneConfig:
    """The paper's settings for `task` (PAPER_SETTINGS; SQuAD as QA), then `overrides`."""
    if task is not None and task not in PAPER_SETTINGS:
        raise ValueError(f"no paper settings for task {task!r}; known: {sorted(PAPER_SETTINGS)}")
    settings = dict(PAPER_SETTINGS.get(task, {}))
    if task == "squad":
        settings["objective"] = "qa"
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown fine-tuning settings {unknown}; known: {sorted(known)}")
    config = FinetuneConfig(**(settings | overrides))
    if config.objective not in OBJECTIVES:
        raise ValueError(f"objective {config.objective!r} is not one of {OBJECTIVES}")
    return config


def learning_rate_schedule(config: FinetuneConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then linear decay to 0 at `total_steps`."""
    warmup = min(config.warmup_steps, total_steps)
    decay = optax.linear_schedule(config.learning_rate, 0.0, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    rise = optax.linear_schedule(0.0, config.learning_rate, warmup)
    return optax.join_schedules([rise, decay], [warmup])


def optimizer(
    config: FinetuneConfig, total_steps: int, mask: PyTree
) -> optax.GradientTransformation:
    """AdamW (optional global-norm clipping) that keeps the pruned weights of `mask` at zero."""
    adamw = optax.adamw(
        learning_rate_schedule(config, total_steps),
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    if config.max_grad_norm is not None:
        adamw = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
    return keep_pruned_zero(adamw, mask)


def model_inputs(model: nnx.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch entries the model's `__call__` accepts (ids, masks, token types, pixels)."""
    accepted = inspect.signature(model.__call__).parameters
    return {k: batch[k] for k in _MODEL_INPUTS if k in batch and k in accepted}


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over rows with weight 1 (padding rows count 0)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def batch_loss(model: nnx.Module, batch: Mapping[str, jax.Array], objective: str) -> jax.Array:
    """Classification: CE on `label`. QA: mean CE of `start_positions` and `end_positions`."""
    inputs = model_inputs(model, batch)
    outputs = model(**inputs)
    if "weights" in batch:
        weights = batch["weights"]
    else:
        weights = jnp.ones(next(iter(inputs.values())).shape[0], jnp.float32)
    if objective == "qa":
        start_logits, end_logits = outputs
        start = weighted_cross_entropy(start_logits, batch["start_positions"], weights)
        end = weighted_cross_entropy(end_logits, batch["end_positions"], weights)
        return (start + end) / 2
    return weighted_cross_entropy(outputs, batch["label"], weights)


def finetune_step(
    graphdef: nnx.GraphDef,
    config: FinetuneConfig,
    params: nnx.State,
    rest: nnx.State,
    opt_state: optax.OptState,
    batch: Mapping[str, jax.Array],
    total_steps: int,
) -> tuple[nnx.State, nnx.State, optax.OptState, jax.Array]:
    """One AdamW step on a batch; returns new params, other state (RNG counts), opt state, loss."""

    model = nnx.merge(graphdef, params, rest)
    loss, grads = nnx.value_and_grad(lambda m: batch_loss(m, batch, config.objective))(model)
    new_rest = nnx.state(model, nnx.Not(nnx.Param))
    tx = optimizer(config, total_steps, mask=None)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_rest, opt_state, loss


STATIC_ARGNUMS = (0, 1, 6)  # graphdef, config, total_steps
train_step = jax.jit(finetune_step, static_argnums=STATIC_ARGNUMS)


def sharded_step(mesh: Mesh, params: nnx.State, rest: nnx.State,
                 opt_state: optax.OptState) -> Callable:
    """`finetune_step` jitted for `mesh`: params, other state and optimizer state in and out as
    `state_shardings` places them, the batch split along its rows, the loss replicated.

    Every call wraps the same `finetune_step` with equal shardings, so jax compiles it once for
    all the masks of one model, config and mesh."""
    state = tuple(state_shardings(tree, mesh) for tree in (params, rest, opt_state))
    return jax.jit(
        finetune_step,
        static_argnums=STATIC_ARGNUMS,
        in_shardings=(*state, batch_sharding(mesh)),
        out_shardings=(*state, replicated(mesh)),
    )


def on_mesh(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """`tree` sharded over `mesh` by `state_shardings` (None leaves stay None); as it is when
    `mesh` is None."""
    return tree if mesh is None else shard(tree, mesh)


def host_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's rows of a batch as global arrays split along their rows over the mesh's
    devices (`mesh.global_batch`); ValueError when they do not split evenly over this host's."""
    rows = len(next(iter(batch.values())))
    devices = len(mesh.local_devices)
    if rows % devices:
        raise ValueError(
            f"a fine-tuning batch of {rows} rows does not split over the mesh's {devices} "
            f"devices on this host; set the fine-tuning batch_size to a multiple of {devices}"
        )
    return global_batch({key: np.asarray(value) for key, value in batch.items()},
                        batch_sharding(mesh))


def run_steps(train_ds: Iterable, config: FinetuneConfig) -> int:
    """`config.total_steps`, else the number of batches in `train_ds`."""
    if config.total_steps is not None:
        return config.total_steps
    try:
        return len(train_ds)
    except TypeError as error:
        raise ValueError(
            "train_ds has no len(); set total_steps in the fine-tuning config"
        ) from error


def finetune(
    model_fn: Callable[[nnx.Rngs], nnx.Module],
    params_mask: PyTree | None,
    train_ds: Iterable[Mapping[str, np.ndarray]],
    config: FinetuneConfig,
    seed: int,
    stop_after: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[nnx.Module, np.ndarray]:
    """Fine-tune `model_fn(nnx.Rngs(seed))` on `train_ds` with the pruned weights fixed at zero.

    `params_mask` is a mask over `nnx.state(model, nnx.Param)` (True = kept, None off-target),
    or None for dense training. Runs `total_steps` batches (default: all of `train_ds`, which
    should hold the epochs, e.g. a `grain.MapDataset` with `repeat`). With `stop_after` = k it
    stops after the first k of them, the schedule still spanning all: the weights at step k of
    the same run (a lottery ticket's rewind point). Returns the trained model in eval mode and
    the per-step losses.

    With a `mesh`, the parameters, optimizer state and mask are sharded over it
    (`state_shardings`), as are the returned model's parameters; `train_ds` yields this host's
    rows of each batch (all of them on one host; `es_jax.data` shards records over hosts), and
    they must split evenly over the host's devices.
    """
    model = model_fn(nnx.Rngs(seed))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if params_mask is None:
        params_mask = jax.tree.map(lambda _: None, params)
    params_mask = on_mesh(params_mask, mesh)
    params = on_mesh(pruning.apply(params, params_mask), mesh)
    rest = on_mesh(rest, mesh)
    total_steps = run_steps(train_ds, config)
    steps = total_steps if stop_after is None else min(stop_after, total_steps)
    opt_state = on_mesh(optimizer(config, total_steps, params_mask).init(params), mesh)
    step_fn = train_step if mesh is None else sharded_step(mesh, params, rest, opt_state)
    losses = []
    for _, batch in zip(range(steps), train_ds, strict=False):
        if mesh is not None:
            batch = host_batch(batch, mesh)
        params, rest, opt_state, loss = step_fn(
            graphdef, config, params, rest, opt_state, batch, total_steps
        )
        losses.append(loss)
    if len(losses) < steps:
        raise ValueError(f"train_ds ran out after {len(losses)} of {steps} batches")
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    return model, np.asarray(jax.device_get(losses), dtype=np.float32)
