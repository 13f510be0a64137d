"""Pre-training objectives as `es_jax.train.pretrain`'s loop runs them: one contract for all.

An `Objective` gives the loop what differs between masked-language modelling (`es_jax.train.mlm`)
and vision pre-training (`es_jax.train.vision`: supervised, or DINO-style self-distillation); the
loop (mesh, Orbax checkpoints, exact resume, divergence watch, logs) is the same for all. The run's
config names its objective (`config.objective`; runs stored before the key existed are "mlm").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

OBJECTIVES = ("mlm", "supervised", "dino")


class Objective(NamedTuple):
    """What the loop needs from an objective.

    init_state(): the initial train state (traced under jit): a dict holding at least "params"
      (what the run produces: analyses and downstream tasks read it), "opt_state", "step"
      (int32 scalar) and "rng" (key data).
    step(state, batch, rest): one optimizer step -> (new state with step + 1, metrics holding at
      least "loss" and "grad_norm"); jit-able, pure in its arguments.
    rest: the model's non-parameter state (RNG counters), the `rest` argument of `step`.
    dataset: this host's grain dataset of host batches, resumable through its iterator's state.
    host_batch(batch): a batch of `dataset` -> the numpy arrays `step` takes.
    quality(state): the run's own quality on held-out data (e.g. k-NN accuracy), computed once at
      the end; None when the objective has no such measure.
    """

    init_state: Callable[[], dict[str, Any]]
    step: Callable[..., tuple[dict[str, Any], dict[str, jax.Array]]]
    rest: nnx.State
    dataset: grain.IterDataset
    host_batch: Callable[[dict], dict]
    quality: Callable[[dict[str, Any]], dict[str, float]] | None


def objective_name(config: ml_collections.ConfigDict | dict) -> str:
    """The objective a (stored) config names; "mlm" where it names none (older runs)."""
    name = config.get("objective", "mlm")
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; use one of {list(OBJECTIVES)}.")
    return name


def make(
    config: ml_collections.ConfigDict, workdir: Path, optimizer: optax.GradientTransformation
) -> Objective:
    """The objective `config` names, with its model, data and optimizer wired in."""
    name = objective_name(config)
    if name == "mlm":
        from es_jax.train import mlm

        return mlm.objective(config, workdir, optimizer)
    from es_jax.train import vision

    return vision.objective(config, optimizer)


def init_train_state(
    params: Any, optimizer: optax.GradientTransformation, seed: int, **extra: Any
) -> dict[str, Any]:
    """A train state: params, optimizer state, step 0, the RNG key's data (from `seed` + 2),
    and any `extra` entries (e.g. a DINO teacher)."""
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed + 2)),
        **extra,
    }


def split_model(build: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph of the model `build` makes and its non-parameter state, without materialising
    its parameters outside jit."""
    graphdef, _, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
    return graphdef, rest


def step_keys(state: dict[str, Any], count: int) -> jax.Array:
    """`count` keys for this step, from the run's key and the step number (resume-exact)."""
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    return jax.random.split(step_key, count)


def training_model(
    graphdef: nnx.GraphDef, params: Any, rest: nnx.State, dropout_key: jax.Array
) -> nnx.Module:
    """The model of `params` in training mode, its dropout drawing from `dropout_key`."""
    model = nnx.merge(graphdef, params, rest)
    nnx.reseed(model, dropout=dropout_key)
    model.train()
    return model


def optimizer_step(
    state: dict[str, Any],
    grads: nnx.State,
    optimizer: optax.GradientTransformation,
    trained: str = "params",
) -> tuple[dict[str, Any], jax.Array]:
    """The state after one optimizer step of `state[trained]` on `grads` (step + 1, the other
    entries as they were), and the gradients' global norm."""
    grads = grads.to_pure_dict()
    updates, opt_state = optimizer.update(grads, state["opt_state"], state[trained])
    new_state = {
        **state,
        trained: optax.apply_updates(state[trained], updates),
        "opt_state": opt_state,
        "step": state["step"] + 1,
    }
    return new_state, optax.tree.norm(grads)
