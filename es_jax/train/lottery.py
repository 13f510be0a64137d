"""Iterative magnitude pruning (IMP, lottery tickets) with rewinding, resumable round by round.

`imp(model_fn, train_ds, config)` runs BERT-Tickets' recipe (PAPER.md section 3) on the sweep's
masked fine-tuning, `es_jax.train.finetune.finetune`, called afresh every round: the same
`model_fn` (pre-trained weights, head initialised from the seed), dropout stream and data order
in every round; only the mask and, with `rewind_step`, the starting weights differ. Masks come
from the pruning core (`es_jax.pruning`). With levels s_0 = 0 < s_1 < ... < s_R
(`config.sparsities`) over the n target weights chosen by `config.where`, the order is:

- Round 0: the mask m_0 keeps every target weight. Fine-tune the pre-trained weights densely:
  theta_0 = finetune(model_fn, m_0); metric_0 = evaluate(theta_0). With `rewind_step` k > 0 the
  rewind point theta_k is the parameters after the first k steps of that same run
  (`rewind_weights`).
- Round r = 1..R: prune, m_r = `prune_further(theta_{r-1}, m_{r-1}, s_r)`: exactly
  round(s_r * n) target weights pruned, the ones m_{r-1} prunes first (so the masks nest), then
  the smallest |theta_{r-1}| among its survivors, globally over the target set. Rewind: start
  from the pre-trained weights (k = 0: `model_fn` as it is) or from theta_k (every parameter,
  the head included: `rewound`), the pruned weights zeroed. Fine-tune with m_r fixed in a fresh
  `finetune` call (new AdamW state and learning-rate schedule): theta_r; metric_r =
  evaluate(theta_r).

The metric of round r is thus that of the ticket of sparsity s_r, fine-tuned from the rewind point
with its mask: what the paper compares with one-shot pruning at each sparsity (with k = 0 it is
exactly the sweep's fine-tuning of m_r). theta_r also gives the magnitudes that round r + 1
prunes by, so a run fine-tunes R + 1 times (and runs k steps more for theta_k).

With a `checkpoint_dir`, the run's settings are stored in `config.json` and each finished round
in `checkpoints/<r>/` (an Orbax checkpoint with checksums, complete before round r + 1 starts):
m_r and m_{r+1} (none after the last round) as {target path: bool array}, the round's losses,
its metric (none without `evaluate`) and, in round 0 when k > 0, theta_k as {path: array}. Run
again with the same settings, `imp` reads the finished rounds and goes on from the first missing
one, so a run killed at any moment (SIGKILL included) ends with the masks and metrics of a run
never interrupted: fine-tuning is deterministic given the seed and the data order. A directory
written with other settings is refused, naming each difference; a round that cannot be read back
as saved raises `checkpointing.UnreadableCheckpoint` naming it (move it and the rounds after it
aside to compute them again).

With a `mesh` (`es_jax.mesh`), every fine-tuning runs on it (`finetune.finetune(..., mesh=)`) and
the masks, the parameters they are pruned from and the rewind point are sharded like the
parameters (`mesh.state_shardings`); the pruning is global and exact over the sharded arrays, so
the masks are those of the run on one device, as long as float rounding of the fine-tuned
weights does not reorder two magnitudes at a threshold.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from es_jax import pruning
from es_jax.train import checkpointing, finetune
from es_jax.train.finetune import FinetuneConfig

PyTree = Any
ModelFn = Callable[[nnx.Rngs], nnx.Module]
Evaluate = Callable[[nnx.State], float]


@dataclasses.dataclass(frozen=True)
class ImpConfig:
    """What an IMP run computes: its fine-tuning, levels, target set, seed and rewind point.

    `sparsities` are the target sparsities of rounds 1..R, strictly ascending in (0, 1] (round 0
    is dense); `sparsity_schedule` gives BERT-Tickets' 10% of the original count per round.
    `where` is a regex over parameter paths (e.g. `models.bert.PRUNABLE`; None: every float
    leaf of 2 or more axes), stored as text with the run's settings. `rewind_step` 0 rewinds to
    the pre-trained weights; k > 0 to the parameters after k steps of the dense round.
    """

    finetune: FinetuneConfig
    sparsities: tuple[float, ...]
    where: str | None = None
    seed: int = 0
    rewind_step: int = 0


class Round(NamedTuple):
    """One IMP round: its index, target sparsity, mask (True = kept, None off target), the metric
    of the model fine-tuned with that mask (None without `evaluate`) and the per-step losses of
    that fine-tuning."""

    index: int
    sparsity: float
    mask: PyTree
    metric: float | None
    losses: np.ndarray


def sparsity_schedule(rounds: int, rate: float = 0.1) -> tuple[float, ...]:
    """The sparsities of rounds 1..`rounds` when each removes `rate` of the *original* target
    count (BERT-Tickets' default 0.1: 0.1, 0.2, ...), rounded to 10 decimals."""
    if rounds < 1 or not 0 < rate * rounds <= 1:
        raise ValueError(f"{rounds} rounds of rate {rate} do not make sparsities in (0, 1]: "
                         f"pass rounds >= 1 and 0 < rate <= 1 / rounds")
    return tuple(round(r * rate, 10) for r in range(1, rounds + 1))


def imp(
    model_fn: ModelFn,
    train_ds: Iterable[Mapping[str, np.ndarray]],
    config: ImpConfig,
    evaluate: Evaluate | None = None,
    checkpoint_dir: str | Path | None = None,
    mesh: Mesh | None = None,
) -> list[Round]:
    """Runs (or resumes) IMP as the module docstring orders it; returns rounds 0..R.

    `model_fn(rngs)` builds a fresh model with the pre-trained weights and a new head, as
    `finetune` takes it; `train_ds` is what `finetune` iterates, from its start in every round
    (a list or a grain dataset, not a one-pass iterator); `evaluate(params)` scores a fine-tuned
    model's `nnx.state(model, nnx.Param)`. With `checkpoint_dir`, each round is saved there as
    it finishes, and the rounds found there are read back instead of being run again. With a
    `mesh`, the rounds are fine-tuned on it and their masks sharded like the parameters.
    """
    params = finetune.on_mesh(nnx.state(model_fn(nnx.Rngs(config.seed)), nnx.Param), mesh)
    dense = finetune.on_mesh(
        pruning.unstructured(pruning.magnitude(params, where=config.where), 0.0), mesh)
    steps = finetune.run_steps(train_ds, config.finetune)
    check_config(config, steps)
    levels = (0.0, *config.sparsities)
    manager, rounds, mask, rewind = None, [], None, None
    if checkpoint_dir is not None:
        settings = run_settings(config, dense, steps, evaluated=evaluate is not None)
        manager = open_rounds(checkpoint_dir, settings)
        rounds, mask, rewind = read_rounds(manager, params, levels, mesh)
    try:
        for index in range(len(rounds), len(levels)):
            if index == 0:
                mask = dense
                if config.rewind_step > 0:
                    rewind = rewind_weights(model_fn, dense, train_ds, config, mesh)
            start = model_fn if rewind is None or index == 0 else rewound(model_fn, rewind)
            trained, losses = finetune.finetune(start, mask, train_ds, config.finetune,
                                                config.seed, mesh=mesh)
            trained_params = nnx.state(trained, nnx.Param)
            metric = None if evaluate is None else float(evaluate(trained_params))
            last = index + 1 == len(levels)
            next_mask = None if last else finetune.on_mesh(
                prune_further(trained_params, mask, levels[index + 1]), mesh)
            finished = Round(index, levels[index], mask, metric, losses)
            if manager is not None:
                save_round(manager, finished, next_mask, rewind if index == 0 else None)
            rounds.append(finished)
            mask = next_mask
    finally:
        if manager is not None:
            manager.close()
    return rounds


def check_config(config: ImpConfig, steps: int) -> None:
    """Refuses levels that are not strictly ascending in (0, 1], and a rewind step that is not
    one of the `steps` steps of a round's fine-tuning."""
    levels = list(config.sparsities)
    if not levels or any(not 0 < s <= 1 for s in levels) or levels != sorted(set(levels)):
        raise ValueError(f"sparsities {levels} are not strictly ascending levels in (0, 1]: give "
                         f"the sparsity after each round, e.g. sparsity_schedule(10) for 10% of "
                         f"the original count per round")
    if not 0 <= config.rewind_step <= steps:
        raise ValueError(f"rewind_step {config.rewind_step} is not a step of the {steps}-step "
                         f"fine-tuning: use 0 (the pre-trained weights) to {steps}")


def prune_further(params: PyTree, mask: PyTree, sparsity: float) -> PyTree:
    """The mask pruning exactly round(sparsity * n) of the n target weights of `mask`: first the
    ones `mask` prunes (scored -1), then the smallest |w| of `params` among those it keeps,
    globally (ties by leaf order, then flat index; `pruning.unstructured`). Masks nest as long as
    `sparsity` is at least that of `mask`."""
    scores = jax.tree.map(
        lambda keep, weight: None if keep is None else jnp.where(keep, jnp.abs(weight), -1.0),
        mask, params, is_leaf=lambda x: x is None,
    )
    return pruning.unstructured(scores, sparsity)


def rewind_weights(model_fn: ModelFn, mask: PyTree, train_ds: Iterable[Mapping[str, np.ndarray]],
                   config: ImpConfig, mesh: Mesh | None = None) -> nnx.State:
    """The parameters after the first `config.rewind_step` steps of
    `finetune(model_fn, mask, train_ds, config.finetune, config.seed, mesh=mesh)`: its model,
    optimizer, schedule (over all of its steps), dropout stream and batches, stopped early."""
    check_config(config, finetune.run_steps(train_ds, config.finetune))
    model, _ = finetune.finetune(model_fn, mask, train_ds, config.finetune, config.seed,
                                 stop_after=config.rewind_step, mesh=mesh)
    return nnx.state(model, nnx.Param)


def rewound(model_fn: ModelFn, params: nnx.State) -> ModelFn:
    """`model_fn` with every parameter set to a copy of `params`; its other state (RNG streams)
    as `model_fn` makes it, so the dropout stream is that of every other round.

    The model is merged anew rather than updated: a `model_fn` that merges a stored state (as the
    sweep's does) shares its variables with that state, which an update would overwrite.
    """

    def build(rngs: nnx.Rngs) -> nnx.Module:
        graphdef, _, rest = nnx.split(model_fn(rngs), nnx.Param, ...)
        return nnx.merge(graphdef, params, rest, copy=True)

    return build


# ----------------------------------------------------------------------------- checkpoints


def run_settings(config: ImpConfig, mask: PyTree, steps: int, evaluated: bool) -> dict[str, Any]:
    """What a checkpoint directory's rounds depend on, as JSON data: the config, the steps of a
    round's fine-tuning, the target leaves' paths and shapes, and whether rounds are evaluated."""
    targets = {path: list(leaf.shape) for path, leaf in by_path(mask).items()}
    settings = {**dataclasses.asdict(config), "steps_per_round": steps, "targets": targets,
                "evaluated": evaluated}
    return json.loads(json.dumps(settings))


def open_rounds(checkpoint_dir: str | Path, settings: dict[str, Any]) -> ocp.CheckpointManager:
    """The manager of `checkpoint_dir`'s rounds, after refusing a directory written with other
    settings and storing these (checked first, so a refused call writes nothing)."""
    checkpoint_dir = Path(checkpoint_dir)
    stored_file = checkpoint_dir / checkpointing.CONFIG_FILE
    if stored_file.exists():
        stored = json.loads(stored_file.read_text())
        differences = sorted(checkpointing.config_differences(stored, settings),
                             key=lambda line: line.startswith("targets."))  # settings first
        if differences:
            shown = differences[:8] + ([f"and {len(differences) - 8} more"]
                                       if len(differences) > 8 else [])
            raise ValueError(f"{checkpoint_dir} holds an IMP run with other settings "
                             f"({stored_file}):\n  " + "\n  ".join(shown)
                             + "\nUse another checkpoint_dir for these settings.")
    checkpointing.store_config(checkpoint_dir, settings, ignore=())
    return checkpointing.open_manager(checkpointing.checkpoint_dir(checkpoint_dir),
                                      async_save=False)


def save_round(manager: ocp.CheckpointManager, finished: Round, next_mask: PyTree | None,
               rewind: nnx.State | None) -> None:
    """Saves a finished round (waiting until it is on disk): its mask, losses, metric, the next
    round's mask and the rewind point, each where there is one."""
    tree = {"mask": by_path(finished.mask), "losses": finished.losses}
    if finished.metric is not None:
        tree["metric"] = np.float64(finished.metric)
    if next_mask is not None:
        tree["next_mask"] = by_path(next_mask)
    if rewind is not None:
        tree["rewind"] = by_path(rewind)
    # Each round iterates train_ds from its start: there is no data-iterator state to keep.
    checkpointing.save(manager, finished.index, tree, None)


def read_rounds(manager: ocp.CheckpointManager, params: nnx.State, levels: tuple[float, ...],
                mesh: Mesh | None = None,
                ) -> tuple[list[Round], PyTree | None, nnx.State | None]:
    """The rounds saved by `manager`, the mask of the round after them (None if none is saved)
    and the rewind point (None: the pre-trained weights), trees of `params`' structure (sharded
    over `mesh` like the parameters, when given)."""
    steps = sorted(manager.all_steps())
    if steps != list(range(len(steps))):
        missing = sorted(set(range(max(steps) + 1)) - set(steps))
        raise ValueError(f"{manager.directory} lacks the checkpoints of rounds {missing} before "
                         f"round {max(steps)}: a run saves its rounds in order, so these were "
                         f"removed; move the later rounds aside too to compute them again")
    rounds, next_mask, rewind = [], None, None
    for index in steps:
        tree = checkpointing.read_state(manager.directory, index)
        metric = float(tree["metric"]) if "metric" in tree else None
        mask = finetune.on_mesh(from_paths(params, tree["mask"]), mesh)
        rounds.append(Round(index, levels[index], mask, metric, tree["losses"]))
        next_mask = (finetune.on_mesh(from_paths(params, tree["next_mask"]), mesh)
                     if "next_mask" in tree else None)
        if "rewind" in tree:
            rewind = finetune.on_mesh(from_paths(params, tree["rewind"]), mesh)
    return rounds, next_mask, rewind


def by_path(tree: PyTree) -> dict[str, Any]:
    """A tree's leaves by path; None leaves (off target in a mask) are left out."""
    return dict(zip(pruning.leaf_paths(tree), jax.tree.leaves(tree), strict=True))


def from_paths(template: PyTree, leaves: Mapping[str, Any]) -> PyTree:
    """A tree of `template`'s structure holding `leaves[path]` (as a jax array) at each of its
    paths that `leaves` has, and None at the others."""
    arrays = [leaves.get(path) for path in pruning.leaf_paths(template)]
    return jax.tree.unflatten(jax.tree.structure(template),
                              [None if a is None else jnp.asarray(a) for a in arrays])
