"""A vision pre-training step of es_jax against the same step in PyTorch, on the same CPU.

    .venv/bin/python benchmarks/vision_step.py [--steps 10] [--rounds 5]

The two steps that `es-jax pretrain` runs for configs/fashion_vit_supervised.py and
configs/fashion_vit_dino.py, at those configs' sizes (a ViT of hidden 128, 4 layers, 4 heads, MLP
256, 4x4 patches of 28x28x1 images; 64 images a step; DINO: 2 global 28x28 and 4 local 12x12 crops
per image, head 512 / 128 / 1024), on the first batch of the configs' own Fashion-MNIST pipeline:

- es_jax: `vision.supervised_step` and `vision.dino_step` from `vision.objective`, jitted and
  watched for divergence by `pretrain.compiled_step`, state and batch placed as the loop places
  them; steps are dispatched one after the other and waited for at the end of a round, as the
  loop waits only when it logs.
- PyTorch: transformers' `ViTForImageClassification` (supervised) and a student / teacher pair of
  `ViTModel`s with the DINO head written below (DINO's: 3-layer GELU MLP, L2 normalisation,
  weight-normalised last layer with its gain fixed to 1), the local crops through
  `interpolate_pos_encoding=True`, DINO's cross-view loss, the teacher's EMA and the centre's
  update; `torch.optim.AdamW` (decay on matrices only, as es_jax) with the same warm-up and
  linear decay, gradient norm clipped, the same initial weights (copied from es_jax through its
  Hugging Face name map, `vit.export_hf_tensors`) and the same batch.

The first step of each framework (same weights, same batch) prints its loss and gradient norm;
they should agree closely for the supervised step and roughly for DINO (es_jax resizes the
position embeddings for the local crops with an antialiased Keys cubic, transformers with torch's
bicubic). PyTorch runs with as many threads as the machine has cores and with 1 thread. Rounds
alternate (es_jax, torch N threads, torch 1 thread, es_jax, ...) after one untimed step of each;
medians of the seconds per step are printed with the ratios torch / es_jax (> 1: es_jax is
faster), the machine it ran on, and one JSON object at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import machine
import ml_collections
import numpy as np
import torch
import transformers
from flax import nnx
from torch.nn import functional

from es_jax.commands import pretrain_config
from es_jax.mesh import batch_sharding, from_config, global_batch, replicated, state_shardings
from es_jax.models import vit
from es_jax.train import objectives, pretrain, vision

OBJECTIVES = ("supervised", "dino")


class Stepper(NamedTuple):
    """One framework's training step on a fixed batch, its first step taken.

    run(n): takes n more steps and returns when their results are computed.
    loss, grad_norm: the first step's loss and gradient norm (before clipping), on the initial
    weights.
    """

    run: Callable[[int], None]
    loss: float
    grad_norm: float


class EsJaxSide(NamedTuple):
    """es_jax's step of an objective, the initial model it stepped from, and its batch."""

    stepper: Stepper
    model: nnx.Module
    batch: dict[str, np.ndarray]


# ----------------------------------------------------------------------------- es_jax


def es_jax_side(config: ml_collections.ConfigDict) -> EsJaxSide:
    """The jitted, watched step of the config's objective as `es-jax pretrain` runs it, on the
    first batch of the objective's own data pipeline, after its first (compiling) step."""
    objective = vision.objective(config, pretrain.make_optimizer(config))
    batch = objective.host_batch(next(iter(objective.dataset)))
    mesh = from_config(config.mesh)
    shardings = state_shardings(jax.eval_shape(objective.init_state), mesh)
    state = jax.jit(objective.init_state, out_shardings=shardings)()
    graphdef, rest = objectives.split_model(lambda: vision.build_model(config))
    model = nnx.merge(graphdef, jax.device_get(state["params"]), rest)
    step = pretrain.compiled_step(objective.step, mesh, shardings)
    placed = global_batch(batch, batch_sharding(mesh))
    health = jax.device_put(pretrain.healthy(), replicated(mesh))
    state, metrics, health = step(state, placed, objective.rest, health)
    carried = [state, health]

    def run(steps: int) -> None:
        state, health = carried
        for _ in range(steps):
            state, _, health = step(state, placed, objective.rest, health)
        carried[:] = jax.block_until_ready((state, health))

    first = jax.device_get(metrics)
    return EsJaxSide(Stepper(run, float(first["loss"]), float(first["grad_norm"])), model, batch)


# ----------------------------------------------------------------------------- PyTorch


def torch_vit_config(config: ml_collections.ConfigDict, **extra: Any) -> transformers.ViTConfig:
    """transformers' ViTConfig of the config's backbone (`config.model`)."""
    m = config.model
    return transformers.ViTConfig(
        hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads, intermediate_size=m.intermediate_size,
        image_size=m.image_size, patch_size=m.patch_size, num_channels=m.num_channels,
        hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout, **extra,
    )


def vit_weights(model: nnx.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The weights of an es_jax ViT model under the torch state-dict `names` of its transformers
    twin: `vit.export_hf_tensors` gives them under the HF names of es_jax's name map, and each
    torch name is one of the names (or aliases) that the map accepts for that tensor."""
    tensors = vit.export_hf_tensors(model)
    primary = {name: spec.hf_name for spec in vit.weight_specs(model)
               for name in (spec.hf_name, *spec.aliases)}
    unknown = [name for name in names if name not in primary]
    if unknown:
        raise ValueError(
            f"es_jax's ViT name map (es_jax/models/vit.py) accepts none of torch's names "
            f"{unknown[:3]}: transformers renamed ViT's modules; add them there as aliases."
        )
    return {name: torch.from_numpy(tensors[primary[name]]) for name in names}


def nchw(images: np.ndarray) -> torch.Tensor:
    """NHWC float32 images as an NCHW torch tensor (a contiguous, writable copy)."""
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The fraction of the peak learning rate that `pretrain.learning_rate_schedule` gives at
    `step`: step / warmup during the warm-up (warmup = min(warmup_steps, total_steps)), then
    falling linearly to 0 at `total_steps`."""
    warmup = min(warmup_steps, total_steps)
    if step < warmup:
        return step / warmup
    return max(0.0, 1.0 - (step - warmup) / max(total_steps - warmup, 1))


def torch_optimizer(
    config: ml_collections.ConfigDict, model: torch.nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters (weight decay on matrices only, as
    `pretrain.make_optimizer`) and its warm-up and linear-decay schedule, stepped per step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate,
                                  betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config.warmup_steps, config.total_steps)
    )
    return optimizer, scheduler


def torch_stepper(step: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Stepper:
    """A Stepper of a torch step that returns (loss, gradient norm), after its first step."""
    loss, grad_norm = step()

    def run(steps: int) -> None:
        for _ in range(steps):
            step()

    return Stepper(run, float(loss), float(grad_norm))


def torch_supervised(
    config: ml_collections.ConfigDict, model: nnx.Module, batch: dict[str, np.ndarray]
) -> Stepper:
    """transformers' ViTForImageClassification holding `model`'s weights, one AdamW step on the
    mean cross-entropy of `batch` with the gradient norm clipped."""
    torch_model = transformers.ViTForImageClassification(
        torch_vit_config(config, num_labels=config.data.num_classes)
    )
    torch_model.load_state_dict(vit_weights(model, torch_model.state_dict()))
    torch_model.train()
    optimizer, scheduler = torch_optimizer(config, torch_model)
    pixels, labels = nchw(batch["pixel_values"]), torch.from_numpy(batch["label"]).long()

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        loss = torch_model(pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(torch_model.parameters(),
                                                   config.grad_clip_norm)
        optimizer.step()
        scheduler.step()
        return loss.detach(), grad_norm

    return torch_stepper(step)


class TorchDinoHead(torch.nn.Module):
    """DINO's projection head: Linear-GELU-Linear-GELU-Linear to the bottleneck, L2
    normalisation, then a bias-free weight-normalised Linear whose gain is fixed to 1."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(in_dim, hidden_dim)
        self.fc2 = torch.nn.Linear(hidden_dim, hidden_dim)
        self.fc3 = torch.nn.Linear(hidden_dim, bottleneck_dim)
        self.last_layer = torch.nn.utils.parametrizations.weight_norm(
            torch.nn.Linear(bottleneck_dim, out_dim, bias=False)
        )
        gain = self.last_layer.parametrizations.weight.original0
        gain.data.fill_(1.0)
        gain.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim) logits."""
        x = functional.gelu(self.fc1(x))
        x = functional.gelu(self.fc2(x))
        return self.last_layer(functional.normalize(self.fc3(x), dim=-1))


class TorchDino(torch.nn.Module):
    """transformers' ViTModel and a TorchDinoHead on its final [CLS] hidden state."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__()
        head = config.dino
        self.vit = transformers.ViTModel(torch_vit_config(config), add_pooling_layer=False)
        self.head = TorchDinoHead(config.model.hidden_size, head.out_dim, head.hidden_dim,
                                  head.bottleneck_dim)

    def forward(self, pixels: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(B, C, H, W) images -> (B, out_dim) logits."""
        hidden = self.vit(pixel_values=pixels, interpolate_pos_encoding=interpolate_pos_encoding)
        return self.head(hidden.last_hidden_state[:, 0])


def dino_weights(model: nnx.Module, torch_model: TorchDino) -> dict[str, torch.Tensor]:
    """The state dict of `torch_model` holding the weights of es_jax's `DinoModel` `model`."""
    names = torch_model.vit.state_dict()
    weights = {f"vit.{k}": v for k, v in vit_weights(model.vit, names).items()}
    for name in ("fc1", "fc2", "fc3"):
        layer = getattr(model.head, name)
        weights[f"head.{name}.weight"] = torch.from_numpy(np.array(layer.kernel[...]).T.copy())
        weights[f"head.{name}.bias"] = torch.from_numpy(np.array(layer.bias[...]))
    direction = np.array(model.head.last_layer.kernel[...]).T.copy()
    weight = "head.last_layer.parametrizations.weight"
    weights[f"{weight}.original0"] = torch.ones(direction.shape[0], 1)
    weights[f"{weight}.original1"] = torch.from_numpy(direction)
    return weights


def torch_dino_loss(
    student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, views: tuple[int, int],
    student_temp: float, teacher_temp: float,
) -> torch.Tensor:
    """DINO's cross-view loss (`es_jax.train.dino.dino_loss`) of view-major logits: student
    (S * B, K) and teacher (T * B, K) for views = (T, S), the student's first T views being the
    teacher's: the mean over pairs t != s of the batch mean of sum_k -q_t log p_s, q_t =
    softmax((teacher_t - center) / teacher_temp), p_s = softmax(student_s / student_temp)."""
    teacher_views, student_views = views
    targets = functional.softmax((teacher - center) / teacher_temp, dim=-1).chunk(teacher_views)
    log_probs = functional.log_softmax(student / student_temp, dim=-1).chunk(student_views)
    terms = [(-target * log_probs[s]).sum(-1).mean()
             for t, target in enumerate(targets) for s in range(student_views) if s != t]
    return torch.stack(terms).mean()


def teacher_momentum(step: int, total_steps: int, base: float) -> float:
    """`es_jax.train.dino.teacher_momentum` in Python: `base` rising to 1 on a cosine."""
    progress = min(step / total_steps, 1.0)
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * progress)) / 2.0


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """`es_jax.train.dino.teacher_temperature` in Python: linear from `start` to `end` over the
    warm-up, then `end`."""
    if warmup_steps == 0:
        return end
    return start + (end - start) * min(step / warmup_steps, 1.0)


def torch_dino(
    config: ml_collections.ConfigDict, model: nnx.Module, batch: dict[str, np.ndarray]
) -> Stepper:
    """A student / teacher pair of TorchDino holding `model`'s weights and DINO's step on
    `batch`: the teacher (eval mode, no gradients) on the global crops, the student on the global
    and the local crops, AdamW on the loss with the gradient norm clipped, then the teacher's EMA
    and the centre's update, with `vision.dino_schedule`'s temperatures and momenta."""
    schedule = vision.dino_schedule(config)
    student = TorchDino(config)
    student.load_state_dict(dino_weights(model, student))
    student.train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer, scheduler = torch_optimizer(config, student)
    global_views = nchw(np.asarray(vision.views_first(batch["global"])))
    local_views = nchw(np.asarray(vision.views_first(batch["local"])))
    views = (batch["global"].shape[1], batch["global"].shape[1] + batch["local"].shape[1])
    center = torch.zeros(config.dino.out_dim)
    taken = [0]

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        (count,) = taken
        with torch.no_grad():
            teacher_out = teacher(global_views)
        student_out = torch.cat(
            [student(global_views), student(local_views, interpolate_pos_encoding=True)]
        )
        temperature = teacher_temperature(count, schedule.teacher_temp_warmup_steps,
                                          schedule.warmup_teacher_temp, schedule.teacher_temp)
        loss = torch_dino_loss(student_out, teacher_out, center, views, schedule.student_temp,
                               temperature)
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip_norm)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            momentum = teacher_momentum(count, schedule.total_steps, schedule.momentum_teacher)
            for old, new in zip(teacher.parameters(), student.parameters(), strict=True):
                old.mul_(momentum).add_(new, alpha=1.0 - momentum)
            center.mul_(schedule.center_momentum).add_(
                teacher_out.mean(0), alpha=1.0 - schedule.center_momentum
            )
        taken[0] = count + 1
        return loss.detach(), grad_norm

    return torch_stepper(step)


# ----------------------------------------------------------------------------- timing


def seconds_per_step(
    runs: dict[str, Callable[[int], None]], steps: int, rounds: int
) -> dict[str, list[float]]:
    """Seconds per step of each run in each of `rounds` rounds of `steps` steps; the runs take
    turns in their order, after one untimed step each."""
    for run in runs.values():
        run(1)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run(steps)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def with_threads(run: Callable[[int], None], threads: int) -> Callable[[int], None]:
    """`run` with torch's intra-op threads set to `threads` first."""

    def threaded(steps: int) -> None:
        torch.set_num_threads(threads)
        run(steps)

    return threaded


def thread_counts() -> list[int]:
    """PyTorch thread counts to try: as many as the machine has cores, and 1."""
    return sorted({os.cpu_count() or 1, 1}, reverse=True)


def benchmark(objective: str, steps: int, rounds: int) -> dict[str, Any]:
    """Times es_jax's and PyTorch's step of one objective; prints a table row and the first
    steps' figures; returns them."""
    config = pretrain_config.vision_config(objective)
    side = es_jax_side(config)
    torch.manual_seed(config.seed)
    make_torch = torch_supervised if objective == "supervised" else torch_dino
    theirs = make_torch(config, side.model, side.batch)
    threads = thread_counts()
    runs = {"es_jax": side.stepper.run}
    runs.update({f"torch_{n}_threads": with_threads(theirs.run, n) for n in threads})
    medians = {name: statistics.median(t) for name, t in
               seconds_per_step(runs, steps, rounds).items()}
    jax_s = medians["es_jax"]
    ratios = {n: medians[f"torch_{n}_threads"] / jax_s for n in threads}
    cells = " | ".join(f"{medians[f'torch_{n}_threads']:.4f} | {ratios[n]:.2f}x" for n in threads)
    print(f"| {objective} | {jax_s:.4f} | {cells} |")
    print(f"  first step, same weights and batch: loss es_jax {side.stepper.loss:.6f}, torch "
          f"{theirs.loss:.6f}; gradient norm es_jax {side.stepper.grad_norm:.6f}, torch "
          f"{theirs.grad_norm:.6f}")
    return {
        "es_jax_step_s": jax_s,
        "torch_step_s": {str(n): medians[f"torch_{n}_threads"] for n in threads},
        "torch_over_es_jax": {str(n): ratio for n, ratio in ratios.items()},
        "first_step": {
            "es_jax": {"loss": side.stepper.loss, "grad_norm": side.stepper.grad_norm},
            "torch": {"loss": theirs.loss, "grad_norm": theirs.grad_norm},
        },
    }


def main() -> None:
    """Times both objectives' steps in alternating rounds; prints the ratios and a JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each framework")
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1:
        raise ValueError(f"--steps ({args.steps}) and --rounds ({args.rounds}) must be >= 1.")
    before = machine.describe()
    threads = thread_counts()
    print(f"torch threads: {' and '.join(map(str, threads))} (default {torch.get_num_threads()}); "
          f"jax devices: {jax.device_count()} {jax.default_backend()}")
    header = " | ".join(f"torch {n} thr s | torch / es_jax" for n in threads)
    print(f"| step | es_jax s | {header} |")
    print("|---|---|" + "---|---|" * len(threads))
    results: dict[str, Any] = {name: benchmark(name, args.steps, args.rounds)
                               for name in OBJECTIVES}
    print(f"medians of {args.rounds} alternating rounds of {args.steps} steps; "
          "torch / es_jax > 1: es_jax is faster")
    machine.report(before)
    dino = pretrain_config.vision_config("dino")
    results["config"] = {
        **dino.model.to_dict(), "batch": dino.global_batch_size,
        "local_crops": dino.data.local_crops, "local_size": dino.data.local_size,
        "dino_head": [dino.dino.hidden_dim, dino.dino.bottleneck_dim, dino.dino.out_dim],
    }
    results.update(steps=args.steps, rounds=args.rounds, cores=os.cpu_count(),
                   torch_threads=threads)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
