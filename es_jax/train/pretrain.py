"""Pre-training from scratch with Orbax checkpoints that resume exactly: one loop, any objective.

`train_and_evaluate(config, workdir)` (behind `es-jax pretrain`) trains the objective the config
names (`es_jax.train.objectives`: MLM BERT on text, or a ViT on images, supervised or DINO-style),
saves checkpoints under `WORKDIR/checkpoints/` and, run again, resumes from the newest readable one.
One code path runs on one CPU and on a TPU pod: the mesh of `es_jax.mesh` over every device,
batches split along its `data` axis, parameters replicated or FSDP-sharded (`config.mesh`), and
`jax.distributed.initialize()` first when `config.distributed` is set (every host runs the same
command). The workdir may be local or a `gs://` URL (every path an `etils.epath.Path`). Orbax
decides each step whether to save (`checkpointing.open_manager`): at the scheduled steps, and, on a
run with `config.distributed`, at the step `jax.distributed`'s preemption service agrees on after a
host receives SIGTERM; a run preempted so stops there (its summary names `preempted_at`, and it
writes no `results.json`), and run again resumes from that step. The loss plot of a run is drawn
from its `train_log.jsonl` by `es_jax.analysis.plots.plot_training_loss`. At the end, objectives
that measure their own quality (k-NN accuracy of a vision backbone) add it to `results.json`.

Nothing is written before the config's values, the workdir's stored config and the shapes of its
checkpoints have all been checked, so a refused command leaves the workdir as it was. A run that
diverges stops with a ValueError naming the step at which its loss, gradient norm or parameters
first became non-finite: the jitted step carries that step (`track_divergence`) on the devices,
and the host reads it only where it already reads the metrics (every `log_every` steps and at
checkpoints), before saving, so no checkpoint holds non-finite parameters.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from es_jax.mesh import batch_sharding, from_config, global_batch, replicated, state_shardings
from es_jax.train import checkpointing, objectives

LOG_FILE = "train_log.jsonl"
RESULTS_FILE = "results.json"
# Keys that say how or where a run goes, not what it computes: a resumed run may change them.
RUN_ONLY_KEYS = (
    "force", "log_every", "async_checkpoints", "distributed", "mesh", "data.data_dir",
    "data.cache_dir",
)


# ----------------------------------------------------------------------------- set-up


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to the peak learning rate, then linear decay to zero at the last step."""
    warmup = min(config.warmup_steps, config.total_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
            optax.linear_schedule(config.learning_rate, 0.0, max(config.total_steps - warmup, 1)),
        ],
        boundaries=[warmup],
    )


def decays(params: Any) -> Any:
    """Weight decay on matrices only: no decay on biases and LayerNorm scales (1-D leaves)."""
    return jax.tree.map(lambda leaf: leaf.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with warm-up and linear decay, after clipping the global gradient norm."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=decays,
        ),
    )


# ----------------------------------------------------------------------------- divergence


def all_finite(tree: Any) -> jax.Array:
    """Whether every leaf of `tree` is free of NaN and inf, as one boolean scalar."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def healthy() -> dict[str, jax.Array]:
    """The divergence record of a run that has not diverged (step -1)."""
    return {"step": jnp.int32(-1), "loss": jnp.float32(0.0), "grad_norm": jnp.float32(0.0),
            "params_finite": jnp.bool_(True)}


def track_divergence(
    health: dict[str, jax.Array],
    step: jax.Array,
    loss: jax.Array,
    grad_norm: jax.Array,
    params_finite: jax.Array,
) -> dict[str, jax.Array]:
    """The record of the first step whose loss, gradient norm or parameters were non-finite:
    `health` once set, else this step's figures if it diverged (jit-able)."""
    diverged = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite)
    first = (health["step"] < 0) & diverged
    now = {"step": step, "loss": loss, "grad_norm": grad_norm, "params_finite": params_finite}
    return jax.tree.map(lambda old, new: jnp.where(first, new, old), health, now)


def check_divergence(
    health: dict[str, Any], last_saved: int, checkpoints: str | os.PathLike
) -> None:
    """Refuses to go on from a diverged run, naming the step and what became non-finite."""
    if health["step"] < 0:
        return
    loss, grad_norm = float(health["loss"]), float(health["grad_norm"])
    became = [name for name, finite in (("loss", np.isfinite(loss)),
                                        ("gradient norm", np.isfinite(grad_norm)),
                                        ("parameters", bool(health["params_finite"])))
              if not finite]
    raise ValueError(
        f"Training diverged at step {int(health['step'])}: the {' and the '.join(became)} became "
        f"non-finite (loss {loss:.4g}, gradient norm {grad_norm:.4g}). Stopped without saving "
        f"it; the newest checkpoint is step {last_saved} in {checkpoints}. Lower "
        "config.learning_rate, raise config.warmup_steps or lower config.grad_clip_norm, then "
        "run in a new --workdir (or continue from that checkpoint with --config.force=True)."
    )


def watched_step(
    state: dict[str, Any],
    batch: dict[str, jax.Array],
    rest: nnx.State,
    health: dict[str, jax.Array],
    *,
    step_fn: Callable,
) -> tuple[dict[str, Any], dict[str, jax.Array], dict[str, jax.Array]]:
    """`step_fn`, and the divergence record updated with its loss, gradient norm and parameters."""
    new_state, metrics = step_fn(state, batch, rest)
    health = track_divergence(health, new_state["step"], metrics["loss"], metrics["grad_norm"],
                              all_finite(new_state["params"]))
    return new_state, metrics, health


def refuse_non_finite(params: Any, checkpoint: str | os.PathLike) -> None:
    """Refuses to resume from parameters holding NaN or inf (saved before runs were watched)."""
    if not bool(jax.jit(all_finite)(params)):
        raise ValueError(
            f"Checkpoint {checkpoint} holds NaN or inf parameters: the run diverged before it. "
            "Move it and the checkpoints after it out of the way to resume from an earlier one, "
            "or start a new --workdir."
        )


# ----------------------------------------------------------------------------- the loop


def write_log(workdir: epath.Path, record: dict[str, Any]) -> None:
    """Adds one JSON line to the run's training log (host 0 only), on a line of its own even
    after a line that a kill cut short.

    The log is written whole and renamed into place (buckets cannot append; the log holds one
    line per checkpoint), so a kill leaves the old log or the new one.
    """
    if jax.process_index() == 0:
        path = workdir / LOG_FILE
        logged = path.read_text() if path.exists() else ""
        separator = "\n" if logged and not logged.endswith("\n") else ""
        partial_path = path.with_suffix(".partial")
        partial_path.write_text(logged + separator + json.dumps(record) + "\n")
        partial_path.replace(path)


def compiled_step(step_fn: Callable, mesh: Mesh, shardings: Any) -> Callable:
    """The jitted, watched train step (`watched_step` of an objective's `step_fn`): state sharded
    as `shardings`, batches along the data axis, metrics and divergence record replicated."""
    return jax.jit(
        partial(watched_step, step_fn=step_fn),
        in_shardings=(shardings, batch_sharding(mesh), None, replicated(mesh)),
        out_shardings=(shardings, replicated(mesh), replicated(mesh)),
    )


def check_values(config: ml_collections.ConfigDict) -> None:
    """Refuses config values that cannot make a run, before anything is written."""
    checkpointing.checkpoint_steps(
        config.total_steps, config.checkpoint_every, config.log_spaced_checkpoints
    )
    if config.log_every <= 0:
        raise ValueError(f"log_every ({config.log_every}) must be positive.")
    if config.global_batch_size <= 0 or config.global_batch_size % jax.device_count():
        raise ValueError(
            f"global_batch_size {config.global_batch_size} is not a positive multiple of the "
            f"{jax.device_count()} devices; pick one."
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, Any]:
    """Pre-trains (or resumes) to `config.total_steps`; returns the last logged metrics, timing
    and the objective's quality measures (`preempted_at`: the step a preempted run stopped at,
    else None; a preempted run measures no quality and writes no results.json)."""
    workdir = checkpointing.as_path(workdir)
    if config.distributed:
        jax.distributed.initialize()
    check_values(config)
    checkpointing.check_config(workdir, config, force=config.force, ignore=RUN_ONLY_KEYS)
    mesh = from_config(config.mesh)
    objective = objectives.make(config, workdir, make_optimizer(config))
    abstract = jax.eval_shape(objective.init_state)
    shardings = state_shardings(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)

    save_at = checkpointing.checkpoint_steps(
        config.total_steps, config.checkpoint_every, config.log_spaced_checkpoints
    )
    iterator = iter(objective.dataset)
    checkpoints = workdir / checkpointing.CHECKPOINT_DIR
    manager = checkpointing.open_manager(checkpoints, config.async_checkpoints, save_at)
    checkpointing.check_layout(manager, target)
    checkpointing.store_config(workdir, config, ignore=RUN_ONLY_KEYS)  # all checked: now write
    restored = checkpointing.restore_latest(manager, target)
    if restored is None:
        start = 0
        state = jax.jit(objective.init_state, out_shardings=shardings)()
        checkpointing.save(manager, 0, state, iterator.get_state())
    else:
        start, state, data_state = restored
        refuse_non_finite(state["params"], checkpoints / str(start))
        iterator.set_state(data_state)

    step_fn = compiled_step(objective.step, mesh, shardings)
    batch_placement = batch_sharding(mesh)
    metrics: dict[str, Any] = {}
    # Placed as the step returns it, so the second step does not compile again.
    health, last_saved = jax.device_put(healthy(), replicated(mesh)), start
    preempted_at = None
    progress = _progress(start, config.total_steps)
    started = time.perf_counter()
    try:
        for step in range(start + 1, config.total_steps + 1):
            batch = global_batch(objective.host_batch(next(iterator)), batch_placement)
            state, step_metrics, health = step_fn(state, batch, objective.rest, health)
            progress.update(1)
            saving = manager.should_save(step)  # a scheduled step, or a preemption's sync point
            if saving or step % config.log_every == 0:
                step_metrics, seen = jax.device_get((step_metrics, health))
                check_divergence(seen, last_saved, checkpoints)
                metrics = {"step": step, **{k: float(v) for k, v in step_metrics.items()}}
                progress.set_postfix(loss=f"{metrics['loss']:.3f}")
            if saving:
                checkpointing.save(manager, step, state, iterator.get_state())
                write_log(workdir, metrics)
                last_saved = step
                if manager.reached_preemption(step):  # every host stops at the sync point
                    preempted_at = step
                    break
    finally:  # a diverged or preempted run still completes the checkpoints it started saving
        manager.wait_until_finished()
        manager.close()
        progress.close()
    elapsed = time.perf_counter() - started
    summary = {
        **metrics,
        "total_steps": config.total_steps,
        "resumed_from": start,
        "preempted_at": preempted_at,
        "seconds": elapsed,
        "steps_per_second": ((preempted_at or config.total_steps) - start) / max(elapsed, 1e-9),
        "checkpoints": save_at,
    }
    if preempted_at is not None:
        return summary
    if objective.quality is not None:
        summary.update(objective.quality(state))
    if jax.process_index() == 0:
        (workdir / RESULTS_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _progress(start: int, total: int):
    """A tqdm progress bar over the steps (silent on hosts other than 0)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=start, desc="pretrain", unit="step",
        disable=jax.process_index() != 0, file=sys.stderr,
    )
