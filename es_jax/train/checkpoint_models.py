"""Pre-training checkpoints as models: a run's weights loaded as any model its family builds.

    model, tokenizer = load_checkpoint_model("runs/smoke", task="mlm")          # newest step
    model, _ = load_checkpoint_model("runs/dino@5000", task="classification", num_labels=10)
    params, where, label = checkpoint_params("runs/smoke@10")    # backbone weights, target set

A source is a pre-training run's directory (what `es-jax pretrain --workdir` was given, local or
a `gs://` URL: it holds `checkpoints/` and `config.json`), `RUN_DIR` for its newest readable
checkpoint or `RUN_DIR@STEP` for a saved step. The run's trained model (by the stored config's
`objective`: "mlm" (runs stored before the key existed), "supervised" or "dino") is rebuilt from
its config and filled from the checkpoint's `state["params"]`, then written out through the
family's Hugging Face name map (`export_hf_tensors`) and loaded back by `models.hub.from_hf`
exactly as a hub checkpoint is: the heads the checkpoint holds are kept, new heads start from the
family's initialiser seeded by `seed`. What each objective's checkpoint holds as a Hugging Face
model:

- mlm: the `BertForMaskedLM` (encoder and MLM head); the tokenizer is the run's (its cached
  WordPiece vocabulary `tokenizer.json`, or the hub tokenizer its config names).
- supervised: the `ViTForImageClassification` (backbone and classifier, `id2label` of its
  classes); asked for a classifier of another `num_labels`, the backbone alone, so the new
  classifier starts from `seed`.
- dino: the teacher's `ViTModel` backbone (its DINO head has no Hugging Face counterpart).

Whatever cannot be loaded is one ValueError line naming it: a missing run directory, one without
checkpoints, a step that was not saved (the saved ones listed), an unknown objective, a checkpoint
of another model than the run's config builds. An unreadable newest checkpoint (files cut short or
not matching their checksums) is skipped with a warning naming it, as the emergence analysis does;
an unreadable step asked for by number is refused.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from es_jax import pruning
from es_jax.train import checkpointing
from es_jax.train.objectives import OBJECTIVES

SOURCE_FORM = "RUN_DIR or RUN_DIR@STEP, RUN_DIR being a pre-training run's --workdir"


class RunSource(NamedTuple):
    """A parsed source: the run's directory and the step asked for (None: the newest readable)."""

    run_dir: epath.Path
    step: int | None


class HfCheckpoint(NamedTuple):
    """A run's checkpoint as a Hugging Face checkpoint: config.json dict, state dict, tokenizer
    (None for vision runs) and its label `RUN_DIR@STEP` (the step actually read)."""

    hf_config: dict
    tensors: dict[str, np.ndarray]
    tokenizer: Any
    label: str


class CheckpointParams(NamedTuple):
    """A checkpoint's backbone weights (numpy, es_jax naming), its family's target set (regex) and
    its label `RUN_DIR@STEP`."""

    params: dict[str, Any]
    where: str
    label: str


def load_checkpoint_model(
    source: str,
    *,
    task: str | None,
    num_labels: int | None = None,
    seed: int = 0,
    dtype: Any = None,
    new_head: bool = False,
) -> tuple[nnx.Module, Any]:
    """`(model, tokenizer)` of a pre-training checkpoint, as `models.load` returns a hub model's.

    `task` as `models.load`'s: None for the backbone (BERT's encoder, ViT's `ViTModel`), else one
    of the family's heads ("mlm", "classification", ...); heads the checkpoint lacks start from the
    family's initialiser seeded by `seed`, and so does a supervised run's own classifier with
    `new_head=True` (fine-tuning, where every seed's head must be new). The tokenizer is None for
    vision runs. The model is in eval mode, its compute dtype `dtype` (None: float32).
    """
    from es_jax.models import hub

    classes = num_labels if task == "classification" else None
    checkpoint = hf_checkpoint(source, classes, backbone_only=new_head)
    try:
        model = hub.from_hf(checkpoint.hf_config, checkpoint.tensors, task=task,
                            num_labels=num_labels, dtype=dtype, seed=seed)
    except ValueError as error:  # an unknown task, or a head the checkpoint cannot fill
        raise ValueError(f"{checkpoint.label}: {error}") from None
    return model, checkpoint.tokenizer


def checkpoint_params(source: str) -> CheckpointParams:
    """The backbone weights of a pre-training checkpoint (the model `load_checkpoint_model` builds
    for task None) as numpy arrays, with its family's PRUNABLE and the checkpoint's label."""
    from es_jax.models import hub

    checkpoint = hf_checkpoint(source, None)
    model = hub.from_hf(checkpoint.hf_config, checkpoint.tensors, task=None)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return CheckpointParams(params, hub.prunable(model), checkpoint.label)


def parse_source(source: str) -> RunSource:
    """`RUN_DIR` -> (RUN_DIR, None); `RUN_DIR@STEP` -> (RUN_DIR, STEP), STEP a non-negative
    integer (the text after the last '@'); a ValueError for an empty directory or a bad step."""
    text = str(source)
    run_dir, at, step = text.rpartition("@")
    if not at:
        run_dir, step = text, ""
    elif not re.fullmatch(r"\d+", step):
        raise ValueError(f"{text!r}: the step after '@' must be a non-negative integer "
                         f"({SOURCE_FORM}).")
    if not run_dir.strip():
        raise ValueError(f"{text!r} names no run directory; give {SOURCE_FORM}.")
    return RunSource(run_path(run_dir), int(step) if step else None)


def is_run(source: str) -> bool:
    """Whether `source` names a pre-training run: it ends in `@STEP`, or it is a directory holding
    `checkpoints/` (a Hugging Face model folder holds none)."""
    text = str(source)
    if re.search(r"@\d+$", text):
        return True
    return checkpointing.checkpoint_dir(run_path(text)).is_dir()


def run_path(text: str) -> epath.Path:
    """A run directory as given: a URL (gs://bucket/run) exactly, a local path with `~`
    expanded."""
    return epath.Path(text) if checkpointing.is_url(text) else epath.Path(text).expanduser()


def hf_checkpoint(source: str, num_labels: int | None, backbone_only: bool = False) -> HfCheckpoint:
    """The checkpoint `source` names as a Hugging Face checkpoint (see the module docstring;
    `num_labels`: the classes of the classifier that will be loaded from it, None to keep the
    run's own; `backbone_only`: a supervised run's backbone without its classifier)."""
    run = open_source(source)
    objective = objective_of(run)
    step, params = chosen_step(run, parse_source(source).step)
    config = ml_collections.ConfigDict(run.config)
    label = f"{run.directory}@{step}"
    if objective == "mlm":
        model, tokenizer = mlm_model(config, run.directory, params, label)
    else:
        model, tokenizer = vision_model(config, objective, params, label), None
    family, exported = exported_model(model, num_labels, backbone_only)
    hf_config = family.config_to_hf(model.config)
    classes = getattr(exported, "num_labels", None)
    if classes is not None:
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(classes)}
    return HfCheckpoint(hf_config, family.export_hf_tensors(exported), tokenizer, label)


# ----------------------------------------------------------------------------------------------
# The run and its step.


def open_source(source: str) -> checkpointing.RunReader:
    """The run `source` names, opened for reading; a ValueError if it is no run with
    checkpoints."""
    run_dir = parse_source(source).run_dir
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist; give {SOURCE_FORM}.")
    if not checkpointing.checkpoint_dir(run_dir).is_dir():
        raise ValueError(f"{run_dir} holds no checkpoints/ directory, so it is no pre-training "
                         f"run; give {SOURCE_FORM}.")
    return checkpointing.open_run(run_dir)


def check_source(source: str) -> None:
    """Refuses, reading no weights, a source that cannot be loaded: no run directory, none with
    checkpoints, a step that was not saved or an unknown objective (one line naming it)."""
    run = open_source(source)
    check_step(run, parse_source(source).step)
    objective_of(run)


def check_step(run: checkpointing.RunReader, step: int | None) -> None:
    """Refuses a step that the run did not save, listing the saved ones (None: any)."""
    if step is not None and step not in run.steps:
        raise ValueError(f"run {run.directory} has no checkpoint at step {step}; saved steps: "
                         f"{list(run.steps)}.")


def chosen_step(run: checkpointing.RunReader, step: int | None) -> tuple[int, Any]:
    """The step asked for (it must be saved and readable) or, for None, the newest readable one
    (unreadable newer ones skipped with a warning naming them); with its parameters."""
    check_step(run, step)
    if step is not None:
        try:
            return step, run.read_params(step)
        except OSError as error:
            raise ValueError(f"{error}; give another step (saved: {list(run.steps)}).") from None
    for newest in reversed(list(run.steps)):
        try:
            return newest, run.read_params(newest)
        except OSError as error:
            warnings.warn(f"{error}; skipping it.", stacklevel=4)
    raise ValueError(f"none of the {len(run.steps)} checkpoints of run {run.directory} can be "
                     "read (see the warnings above); pre-train it again.")


def objective_of(run: checkpointing.RunReader) -> str:
    """The objective the run's stored config names ("mlm" where it names none)."""
    objective = run.config.get("objective", "mlm")
    if objective not in OBJECTIVES:
        raise ValueError(f"{run.directory / checkpointing.CONFIG_FILE}: unknown objective "
                         f"{objective!r}; this version loads {list(OBJECTIVES)}.")
    return objective


# ----------------------------------------------------------------------------------------------
# The trained model of each objective.


def mlm_model(config: ml_collections.ConfigDict, run_dir: epath.Path, params: Any,
              label: str) -> tuple[nnx.Module, Any]:
    """The run's BertForMaskedLM filled from `params`, and the run's tokenizer."""
    from es_jax.models import bert
    from es_jax.train import mlm

    if config.data.tokenizer == "wordpiece" and not (run_dir / mlm.TOKENIZER_FILE).is_file():
        raise ValueError(f"run {run_dir} lacks its WordPiece vocabulary {mlm.TOKENIZER_FILE}, "
                         "without which its token ids mean nothing; copy the run complete.")
    tokenizer = mlm.load_tokenizer(config, run_dir)
    bert_config = mlm.bert_config(config, len(tokenizer))
    build = lambda: bert.BertForMaskedLM(bert_config, rngs=nnx.Rngs(0))
    return filled(build, params, label), tokenizer


def vision_model(config: ml_collections.ConfigDict, objective: str, params: dict[str, Any],
                 label: str) -> nnx.Module:
    """The run's trained ViT filled from `params`: the ViTForImageClassification of a supervised
    run (its classes read from the saved classifier), the teacher's ViTModel (no pooler) of a
    DINO run."""
    from es_jax.models import vit
    from es_jax.train import vision

    vit_config = vision.vit_config(config)
    if objective == "supervised":
        classes = int(np.shape(params["classifier"]["kernel"])[-1])
        build = lambda: vit.ViTForImageClassification(vit_config, classes, rngs=nnx.Rngs(0))
        return filled(build, params, label)
    build = lambda: vit.ViTModel(vit_config, add_pooling_layer=False, rngs=nnx.Rngs(0))
    return filled(build, params["vit"], label)


def exported_model(
    model: nnx.Module, num_labels: int | None, backbone_only: bool = False
) -> tuple[Any, nnx.Module]:
    """The family of `model` and the module to export: `model`, or its backbone where it is a
    classifier of other than `num_labels` classes or `backbone_only` is set (so that a new
    classifier is initialised)."""
    from es_jax.models import hub, vit

    classifier = isinstance(model, vit.ViTForImageClassification)
    other_classes = classifier and num_labels not in (None, model.num_labels)
    return hub.family_of(model), model.vit if other_classes or backbone_only else model


def filled(build: Callable[[], nnx.Module], params: Any, label: str) -> nnx.Module:
    """The model `build` makes (abstractly: no initialisation), every parameter set from the
    checkpoint tree `params`, whose '/'-joined paths and shapes must be exactly the model's."""
    model = nnx.eval_shape(build)
    saved = dict(zip(pruning.leaf_paths(params), jax.tree.leaves(params), strict=True))
    variables = {"/".join(map(str, path)): variable
                 for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    missing, extra = sorted(set(variables) - set(saved)), sorted(set(saved) - set(variables))
    wrong = [f"{path} {np.shape(saved[path])} (the config builds {variable.get_value().shape})"
             for path, variable in variables.items()
             if path in saved and tuple(np.shape(saved[path])) != variable.get_value().shape]
    if missing or extra or wrong:
        what = (f"lacks {missing[:3]}" if missing else f"holds {extra[:3]} besides"
                if extra else f"has {wrong[0]}")
        raise ValueError(f"checkpoint {label} {what}: it is not of the model its run's "
                         "config.json builds (the config was changed after the run?).")
    for path, variable in variables.items():
        variable.set_value(jnp.asarray(saved[path]))
    return model
