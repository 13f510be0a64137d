"""es-jax sweep --workdir runs/default   (this file is the embedded default config)

The config of `es-jax sweep` and its checks: the embedded default (`default_config()`, also
`get_config()` so that `--config es_jax/commands/sweep_config.py[:tiny]` works like any config
file), one model entry's settings (`model_settings()`), the `:tiny` variant that shrinks any
sweep config to a smoke run of tiny random models (`with_variant`), and everything that can be
checked before any work starts: sparsity patterns (global, layerwise, per_output, N:M), the
grid, scorers and the patterns each takes, each model's family against the kind of model its
tasks need, the calibration text, fine-tune settings and seeds, and a pre-training checkpoint
source (`checkpoint:RUN_DIR[@STEP]`, its run and step), the parameter dtype, and the mesh
(`config.mesh`: its shape against the devices, and every zero-shot entry's batch_size against
the device count, since evaluation batches are split over every device), so a bad config fails
with a ValueError up front. It also says what a model entry loads (`checkpoint_source`), in which
dtype (`param_dtype`), and how its images are normalised (`image_normalisation`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from es_jax.analysis import essential
from es_jax.commands.command_line import mesh_settings
from es_jax.evaluate import tasks as task_registry

# Scorers whose scores are computed once and give every level's mask by one selection.
SCORE_SCORERS = ("magnitude", "wanda", "random")
# Methods that prune block by block on calibration data, once per level (models.prune_sequential),
# with the named patterns each takes besides N:M: SparseGPT selects within each kernel, Wanda as
# its paper does within each output unit.
SEQUENTIAL_SCORERS = {"sparsegpt": "layerwise", "wanda_sequential": "per_output"}
SCORERS = (*SCORE_SCORERS, *SEQUENTIAL_SCORERS)
NAMED_PATTERNS = ("global", "layerwise", "per_output")
N_OF_M = re.compile(r"^(\d+):(\d+)$")
MIN_SPEARMAN = 3  # examples a Spearman correlation needs to be a finite number
FREE_FORM = ("tiny", "finetune")  # model settings whose keys are not fixed in advance
# Families by the model kind a task needs (see tasks.ENCODER etc.).
HEAD_FAMILIES = {
    task_registry.ENCODER: ("bert",),
    task_registry.CAUSAL_LM: ("llama", "opt"),
    task_registry.MASKED_LM: ("bert",),
    task_registry.CLASSIFIER: ("bert", "opt"),
    task_registry.IMAGE_CLASSIFIER: ("vit",),
    task_registry.IMAGE_ENCODER: ("vit",),
    task_registry.QUESTION_ANSWERING: ("bert",),
}
# The `task` argument of `models.load` / a family's `build` for each model kind.
HEAD_TASK = {
    task_registry.ENCODER: None,
    task_registry.CAUSAL_LM: "causal_lm",
    task_registry.MASKED_LM: "mlm",
    task_registry.CLASSIFIER: "classification",
    task_registry.IMAGE_CLASSIFIER: "classification",
    task_registry.IMAGE_ENCODER: None,
    task_registry.QUESTION_ANSWERING: "qa",
}
# A model entry that loads a pre-training run's checkpoint: "checkpoint:RUN_DIR[@STEP]".
CHECKPOINT_PREFIX = "checkpoint:"
# The model_type of each pre-training objective's checkpoint (es_jax.train.checkpoint_models).
OBJECTIVE_MODEL_TYPE = {"mlm": "bert", "supervised": "vit", "dino": "vit"}
# Fine-tune tasks outside the paper's Table 1 that take a Table 1 column's settings.
PAPER_TASK = {"fashion_mnist_few": "fashion_mnist"}
# The parameter dtypes a model entry may load its weights in (`dtype`).
DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------
# Configuration.


def model_settings(**overrides: Any) -> ml_collections.ConfigDict:
    """One model's entry of `config.models`: what to load, which tasks, scorers and patterns."""
    settings = ml_collections.ConfigDict(
        {
            # bundled name ("minilm", "smollm2"), local HF folder, .gguf, hub id, or a run of
            # `es-jax pretrain`: "checkpoint:RUN_DIR" (its newest step) or "checkpoint:RUN_DIR@STEP"
            "name": "",
            # the dtype the parameters are loaded and evaluated in (one of DTYPES); "bfloat16"
            # halves a model's memory. A checkpoint: entry loads float32.
            "dtype": "float32",
            # HF config.json fields of a random tiny model used instead of `name` (tests, smoke
            # runs): e.g. {"model_type": "bert", "hidden_size": 32, ...}. Empty = load `name`.
            "tiny": ml_collections.ConfigDict(),
            "tokenizer": "minilm",  # the tokenizer of a tiny model (a bundled name or folder)
            "tasks": (),
            "scorers": ("magnitude",),
            "patterns": ("global",),
            "batch_size": 16,
            "max_length": 256,  # tokens per document (Lee), sentence or MMLU prompt + answer
            "word_max_length": 16,  # tokens per word (WordSim-353, SimLex-999)
            "max_examples": 0,  # keep the first N documents / pairs / questions (0 = all)
            "lm_length": 256,  # tokens per block of the fixed Wikipedia text
            "lm_blocks": 16,  # blocks of the fixed Wikipedia text (perplexity, MLM loss)
            # mmlu: the questions, an MMLU-format folder (<subject>_test.csv, _dev.csv), a tfds
            # dataset "tfds:NAME" (question, choices, answer) or the bundled offline set "facts".
            "mc_data": "facts",
            "mc_shots": 0,  # solved examples of the same subject (from dev) before each question
            "mc_style": "letter",  # continuations " A", " B", ... or "text": " " + the choice
            # Calibration (Wanda, SparseGPT): blocks of a corpus that no evaluation reads.
            "calibration_text": "lee_background",
            "calibration_blocks": 8,
            "calibration_length": 256,
            "sparsegpt_block_size": 128,  # SparseGPT's column blocks
            "sparsegpt_dampening": 0.01,  # added to the Hessian's diagonal, times its mean
            # Fine-tune tasks (GLUE, SQuAD, CIFAR): overrides of the paper's Table 1 settings
            # (es_jax.train.finetune.FinetuneConfig fields, e.g. total_steps, learning_rate).
            "finetune": ml_collections.ConfigDict(),
            "max_train_examples": 0,  # keep the first N training examples (0 = all)
            "doc_stride": 128,  # SQuAD windows
            "image_size": 224,  # vision: images are resized to this square size (the model's)
            "labels_per_class": 100,  # fashion_mnist_few (and fashion_knn's bank): images a class
            # Fine-tune tasks: fine-tune every level once per seed (head, data order, held-out
            # split); the level's value is the seed mean. () = config.seed alone.
            "seeds": (),
        }
    )
    for key, value in overrides.items():
        if key not in settings:
            raise ValueError(f"unknown model setting {key!r}; known settings: {sorted(settings)}.")
        settings[key] = ml_collections.ConfigDict(value) if key in FREE_FORM else value
    return settings


def default_config() -> ml_collections.ConfigDict:
    """The embedded default: MiniLM zero-shot similarity and SmolLM2 Wikipedia perplexity."""
    config = ml_collections.ConfigDict()
    config.grid = tuple(round(0.1 * i, 1) for i in range(10))
    config.refine = 0  # extra levels between the essential sparsity and the next grid level
    config.epsilon = ml_collections.ConfigDict({"absolute": 1.0, "relative": 0.01})
    config.seed = 0
    config.data_dir = ""  # '' = $ES_JAX_DATA_DIR or ~/tensorflow_datasets
    config.plot_sparsity = 0.5  # the level whose mask the per-layer and component plots show
    # Recompute (and replace) stored runs of this config that were computed with other settings;
    # by default a sweep refuses, so that a results.json never loses a run it was not told to.
    config.overwrite = False
    # The device mesh zero-shot entries run on: parameters and level arrays sharded over `fsdp`,
    # evaluation batches split over every device (es_jax.mesh); -1 takes the devices left.
    config.mesh = mesh_settings()
    config.models = ml_collections.ConfigDict()
    config.models.minilm = model_settings(
        name="minilm",
        tasks=("lee", "wordsim353", "simlex999"),
        scorers=("magnitude",),
        patterns=("global", "2:4"),
        max_length=256,
        word_max_length=8,
        batch_size=25,
    )
    config.models.smollm2 = model_settings(
        name="smollm2",
        tasks=("wikitext",),
        scorers=("magnitude", "wanda"),
        patterns=("global",),
        lm_length=256,
        lm_blocks=4,
        batch_size=4,
        calibration_blocks=4,
        calibration_length=256,
    )
    return config


TOP_LEVEL_KEYS = frozenset(default_config().keys())
DEFAULT_FAMILIES = {"minilm": "bert", "smollm2": "llama"}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The embedded default sweep; variant 'tiny' for a smoke run of tiny random models."""
    return with_variant(default_config(), variant, DEFAULT_FAMILIES)


def with_variant(
    config: ml_collections.ConfigDict, variant: str, family_of_entry: dict[str, str]
) -> ml_collections.ConfigDict:
    """The config as it is (variant ''), or shrunk to a smoke run (variant 'tiny')."""
    if variant == "tiny":
        shrink(config, family_of_entry)
    elif variant:
        raise ValueError(f"unknown config variant {variant!r}; use FILE or FILE:tiny.")
    return config


def shrink(config: ml_collections.ConfigDict, family_of_entry: dict[str, str]) -> None:
    """Turns a paper config into a smoke run (in place): tiny random models, two levels, two
    training steps, a few examples (2 images a class), batches of 8 (they split over the 8 host
    devices of the tests), at most two seeds, the first task and pattern of each model entry,
    and one entry per distinct (family, model kind, pattern kind, scorers)."""
    from es_jax.models import hub

    config.grid = (0.0, 0.5)
    config.plot_sparsity = 0.5
    seen = set()
    for key, family in family_of_entry.items():
        settings = config.models[key]
        kind = (
            family,
            task_registry.get(settings.tasks[0]).head,
            parse_pattern(settings.patterns[0]).is_n_of_m,
            tuple(settings.scorers),
        )
        if kind in seen:
            del config.models[key]
            continue
        seen.add(kind)
        settings.tiny = ml_collections.ConfigDict(hub.TINY_HF_CONFIGS[family])
        settings.tasks = settings.tasks[:1]
        settings.patterns = settings.patterns[:1]
        settings.max_examples = 8
        settings.max_train_examples = 16
        settings.batch_size = 8
        settings.max_length = 32
        settings.lm_length = 32
        settings.lm_blocks = 4
        settings.calibration_blocks = 2
        settings.calibration_length = 32
        settings.image_size = 32
        settings.labels_per_class = 2
        settings.seeds = tuple(settings.seeds)[:2]
        settings.finetune = ml_collections.ConfigDict(
            {"total_steps": 2, "batch_size": 4, "num_epochs": 1}
        )


# ----------------------------------------------------------------------------------------------
# Validation: everything that can be checked before any work starts.


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: global, layerwise or per-output unstructured, or N:M (keep n of every
    m)."""

    name: str
    n: int = 0
    m: int = 0

    @property
    def is_n_of_m(self) -> bool:
        """True for an N:M pattern."""
        return self.m > 0


def parse_pattern(text: str) -> Pattern:
    """A Pattern from "global", "layerwise", "per_output" or "N:M" (e.g. "2:4"); ValueError
    otherwise."""
    if text in NAMED_PATTERNS:
        return Pattern(text)
    match = N_OF_M.match(text)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"pattern {text!r}: N:M needs 0 < N < M (keep N of every M).")
        return Pattern(text, n, m)
    raise ValueError(
        f"unknown pattern {text!r}; use 'global', 'layerwise', 'per_output' or N:M such as '2:4'."
    )


def check_grid(grid: Sequence[float], where: str = "grid") -> tuple[float, ...]:
    """The grid as sorted unique floats in [0, 1); ValueError if empty or out of range."""
    try:
        values = tuple(sorted({float(s) for s in grid}))
    except (TypeError, ValueError):
        raise ValueError(f"{where} holds {list(grid)}, not sparsities such as 0.0,0.5.") from None
    if not values:
        raise ValueError(f"{where} is empty; give sparsities such as 0.0,0.1,...,0.9.")
    bad = [s for s in values if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(f"{where} has sparsities outside [0, 1): {bad}; use values like 0.5.")
    return values


def model_type(settings: ml_collections.ConfigDict) -> str:
    """The HF model_type of a model entry, read without loading weights (a checkpoint source's
    from its run's objective, after checking that the run and step exist)."""
    from es_jax.models import hub

    if len(settings.tiny):
        if "model_type" not in settings.tiny:
            raise ValueError("a tiny model config needs a 'model_type' (bert, llama, opt, vit).")
        return settings.tiny.model_type
    if not settings.name:
        raise ValueError("a model entry needs a 'name' (bundled name, folder, .gguf or hub id).")
    source = checkpoint_source(settings)
    if source is not None:
        return OBJECTIVE_MODEL_TYPE[checkpoint_run(source).objective]
    location = hub.resolve(settings.name, None)
    if location.suffix == ".gguf":
        return "llama"
    return str(hub.read_config(location).get("model_type"))


def checkpoint_source(settings: ml_collections.ConfigDict) -> str | None:
    """What a "checkpoint:RUN_DIR[@STEP]" entry loads, as "RUN_DIR@STEP" with the step resolved
    (`checkpoint_run`); None for any other entry."""
    if len(settings.tiny) or not settings.name.startswith(CHECKPOINT_PREFIX):
        return None
    return checkpoint_run(settings.name.removeprefix(CHECKPOINT_PREFIX)).source


class CheckpointRun(NamedTuple):
    """A pre-training checkpoint a sweep loads: "RUN_DIR@STEP" and its run's objective."""

    source: str
    objective: str


@functools.cache
def checkpoint_run(source: str) -> CheckpointRun:
    """The checkpoint "RUN_DIR" (its newest saved step, fixed for this process) or
    "RUN_DIR@STEP" names; ValueError of one line when the run directory, its checkpoints or the
    step do not exist."""
    from es_jax.train import checkpoint_models

    parsed = checkpoint_models.parse_source(source)
    run = checkpoint_models.open_source(source)
    checkpoint_models.check_step(run, parsed.step)
    step = run.steps[-1] if parsed.step is None else parsed.step
    return CheckpointRun(f"{parsed.run_dir}@{step}", checkpoint_models.objective_of(run))


def image_normalisation(settings: ml_collections.ConfigDict) -> task_registry.Normalisation:
    """The pixel normalisation a model entry's images get: `image_mean` and `image_std` of the
    preprocessor_config.json of a model folder (or hub snapshot) whose tasks read images, else
    [-1, 1] (`tasks.UNIT_RANGE`: tiny models, pre-training checkpoints, text models)."""
    heads = {task_registry.get(t).head for t in settings.tasks if t in task_registry.TASKS}
    vision = {task_registry.IMAGE_CLASSIFIER, task_registry.IMAGE_ENCODER}
    if len(settings.tiny) or not heads & vision or settings.name.startswith(CHECKPOINT_PREFIX):
        return task_registry.UNIT_RANGE
    return preprocessor_normalisation(settings.name)


@functools.cache
def preprocessor_normalisation(name: str) -> task_registry.Normalisation:
    """`image_mean` / `image_std` of the preprocessor_config.json of the model `name` resolves
    to (one value each when every channel's is the same; mean 0, std 1 when it sets
    do_normalize false); [-1, 1] when it has none."""
    from es_jax.models import hub

    path = hub.resolve(name, None) / "preprocessor_config.json"
    if not path.is_file():
        return task_registry.UNIT_RANGE
    config = hub.read_json(path)
    if config.get("do_normalize") is False:
        return task_registry.Normalisation((0.0,), (1.0,))
    try:
        mean, std = config["image_mean"], config["image_std"]
        mean, std = [float(m) for m in np.ravel(mean)], [float(d) for d in np.ravel(std)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{path} gives no numeric image_mean and image_std; add them (e.g. [0.5, 0.5, 0.5])."
        ) from None
    if not mean or len(mean) != len(std) or min(std) <= 0:
        raise ValueError(
            f"{path}: image_mean {mean} and image_std {std} must be equally long, non-empty, "
            "std positive."
        )
    if len(set(mean)) == 1 and len(set(std)) == 1:  # the same for every channel: one value
        mean, std = mean[:1], std[:1]
    return task_registry.Normalisation(tuple(mean), tuple(std))


def family_name(model_type_name: str) -> str:
    """The es_jax family ("bert", "llama", ...) handling an HF model_type."""
    from es_jax.models import hub

    return hub.family_for(model_type_name).__name__.rsplit(".", 1)[-1]


def paper_task(task_name: str) -> str | None:
    """The key of a fine-tune task in the paper's Table 1 (mnli, squad, cifar10, ...;
    fashion_mnist_few takes Fashion-MNIST's); None for a task the paper does not fine-tune on
    (pang_lee, text_source, digits: the default settings)."""
    from es_jax.train import finetune

    if task_name.startswith("glue/"):
        key = task_name.split("/", 1)[1]
    else:
        key = PAPER_TASK.get(task_name, task_name.split("/", 1)[0])
    return key if key in finetune.PAPER_SETTINGS else None


def finetune_config(task_name: str, settings: Any) -> Any:
    """The paper's fine-tuning settings for a task, with the model entry's overrides."""
    from es_jax.train import finetune

    overrides = settings.finetune.to_dict()
    if overrides.get("total_steps") == 0:
        overrides["total_steps"] = None
    return finetune.finetune_config(paper_task(task_name), **overrides)


def check_examples(key: str, settings: ml_collections.ConfigDict) -> None:
    """Refuses `max_examples` too small for a task's metric to be a finite number: a Spearman
    correlation needs at least 3 pairs (Lee: 3 documents give 3 pairs)."""
    count = settings.max_examples
    for task_name in settings.tasks:
        if task_registry.get(task_name).metric == "spearman" and 0 < count < MIN_SPEARMAN:
            raise ValueError(
                f"models.{key}.max_examples={count}: {task_name} is scored by a Spearman "
                f"correlation, which needs at least {MIN_SPEARMAN} examples (0 = all)."
            )


def check_scorer(key: str, settings: ml_collections.ConfigDict, scorer: str) -> None:
    """Refuses an unknown scorer, a pattern a sequential method does not take, a sequential
    method on a model that is not a causal LM, and calibration on the evaluation text."""
    from es_jax.data.corpora import OFFLINE_CORPORA

    if scorer not in SCORERS:
        raise ValueError(f"models.{key}: unknown scorer {scorer!r}; use one of {SCORERS}.")
    if scorer in ("wanda", *SEQUENTIAL_SCORERS):
        if settings.calibration_text not in OFFLINE_CORPORA:
            raise ValueError(
                f"models.{key}.calibration_text={settings.calibration_text!r} is not a corpus; "
                f"use one of {list(OFFLINE_CORPORA)}."
            )
        evaluated = {TASK_TEXT[t] for t in settings.tasks if t in TASK_TEXT}
        if settings.calibration_text in evaluated:
            raise ValueError(
                f"models.{key}: calibration_text={settings.calibration_text!r} is the text "
                f"{list(settings.tasks)} evaluate on; calibrate on another corpus "
                "(e.g. 'lee_background')."
            )
    if scorer not in SEQUENTIAL_SCORERS:
        return
    named = SEQUENTIAL_SCORERS[scorer]
    for text in settings.patterns:
        pattern = parse_pattern(text)
        if not pattern.is_n_of_m and pattern.name != named:
            raise ValueError(
                f"models.{key}: {scorer} prunes with the patterns {named!r} and N:M, not "
                f"{text!r}; put {scorer} in a model entry of its own with those patterns."
            )
    heads = {task_registry.get(t).head for t in settings.tasks}
    if heads != {task_registry.CAUSAL_LM}:
        raise ValueError(
            f"models.{key}: {scorer} prunes a causal LM block by block, but the tasks "
            f"{list(settings.tasks)} need a {sorted(heads)} model; use it with causal-LM tasks."
        )
    if settings.sparsegpt_block_size <= 0 or settings.sparsegpt_dampening < 0:
        raise ValueError(
            f"models.{key}: sparsegpt_block_size must be positive and sparsegpt_dampening "
            f"non-negative, got {settings.sparsegpt_block_size}, {settings.sparsegpt_dampening}."
        )


def check_multiple_choice(key: str, settings: ml_collections.ConfigDict) -> None:
    """Refuses a multiple-choice style or shot count the mmlu task cannot use."""
    from es_jax.evaluate.multiple_choice import STYLES

    if "mmlu" not in settings.tasks:
        return
    if settings.mc_style not in STYLES:
        raise ValueError(
            f"models.{key}.mc_style={settings.mc_style!r}; use one of {STYLES}."
        )
    if settings.mc_shots < 0:
        raise ValueError(f"models.{key}.mc_shots must be >= 0, got {settings.mc_shots}.")


def param_dtype(settings: ml_collections.ConfigDict) -> Any:
    """The numpy dtype a model entry's parameters load in (its `dtype`)."""
    import jax.numpy as jnp

    return jnp.dtype(settings.dtype)


def check_dtype(key: str, settings: ml_collections.ConfigDict) -> None:
    """Refuses a dtype outside DTYPES, and another than float32 on a checkpoint: entry (a
    pre-training run's weights load as they were trained)."""
    if settings.dtype not in DTYPES:
        raise ValueError(f"models.{key}.dtype={settings.dtype!r}; use one of {DTYPES}.")
    if settings.dtype != "float32" and str(settings.name).startswith(CHECKPOINT_PREFIX):
        raise ValueError(
            f"models.{key}.dtype={settings.dtype!r}: a checkpoint: entry loads its run's float32 "
            "weights; remove dtype from this entry."
        )


def check_mesh(config: ml_collections.ConfigDict) -> None:
    """Refuses a `config.mesh` whose shape is not the devices (es_jax.mesh.mesh_shape), and a
    zero-shot entry whose batch_size does not divide by the device count (its evaluation
    batches are split over every device)."""
    import jax

    from es_jax.mesh import mesh_shape

    devices = jax.device_count()
    mesh_shape(int(config.mesh.data), int(config.mesh.fsdp), devices)
    for key, settings in config.models.items():
        zero_shot = task_registry.get(settings.tasks[0]).protocol == "zero_shot"
        if zero_shot and settings.batch_size % devices:
            raise ValueError(
                f"models.{key}.batch_size={settings.batch_size} does not split over the "
                f"{devices} devices of config.mesh; set a multiple of {devices}."
            )


def run_seeds(settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> tuple:
    """The seeds a fine-tune entry fine-tunes every level with: its `seeds`, or config.seed."""
    return tuple(settings.seeds) or (config.seed,)


def check_seeds(key: str, settings: ml_collections.ConfigDict, protocol: str) -> None:
    """Refuses seeds that are not distinct non-negative integers, and seeds on zero-shot tasks
    (evaluated once: nothing in them is drawn from a seed but config.seed's k-NN bank)."""
    seeds = list(settings.seeds)
    if not seeds:
        return
    if protocol == "zero_shot":
        raise ValueError(
            f"models.{key}.seeds={seeds}: the tasks {list(settings.tasks)} are zero-shot and "
            "evaluated once; set seeds=() on this entry (seeds apply to fine-tune tasks)."
        )
    if len(set(seeds)) != len(seeds) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds
    ):
        raise ValueError(
            f"models.{key}.seeds={seeds}: give distinct non-negative integers, e.g. (0, 1, 2)."
        )


# The corpus each text task evaluates on (calibration must not read it).
TASK_TEXT = {"wikitext": "wikipedia", "wikitext_loss": "wikipedia", "wikitext_mlm": "wikipedia"}


def check_held_out(key: str, settings: ml_collections.ConfigDict) -> None:
    """Refuses Wikipedia text a pre-training checkpoint may have trained on: the wikitext tasks
    of a `checkpoint:` entry must read within the held-out articles (at most 8 characters a
    token: lm_length * lm_blocks <= HELD_OUT_CHARACTERS / 8 tokens)."""
    from es_jax.data import corpora

    if not str(settings.name).startswith(CHECKPOINT_PREFIX):
        return
    limit = corpora.HELD_OUT_CHARACTERS // 8
    reading = settings.lm_length * settings.lm_blocks
    if any(task in TASK_TEXT for task in settings.tasks) and reading > limit:
        raise ValueError(
            f"models.{key}: lm_length * lm_blocks = {reading} tokens may read past the "
            f"Wikipedia articles no pre-training run trains on ({limit} tokens); lower lm_blocks."
        )


def validate(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Checks the whole config; returns {model key: family}. ValueError before any work."""
    unknown = sorted(set(config.keys()) - TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(TOP_LEVEL_KEYS)}.")
    check_grid(config.grid)
    if config.refine < 0:
        raise ValueError(f"refine must be >= 0 extra levels, got {config.refine}.")
    essential.Epsilon(config.epsilon.absolute)
    essential.Epsilon(config.epsilon.relative, relative=True)
    if not 0.0 <= config.plot_sparsity < 1.0:
        raise ValueError(f"plot_sparsity must lie in [0, 1), got {config.plot_sparsity}.")
    if not len(config.models):
        raise ValueError("config.models is empty; add at least one model entry.")
    known_settings = set(model_settings().keys())
    families = {}
    for key, settings in config.models.items():
        extra = sorted(set(settings.keys()) - known_settings)
        if extra:
            raise ValueError(
                f"models.{key}: unknown settings {extra}; known: {sorted(known_settings)}."
            )
        if not settings.tasks:
            raise ValueError(f"models.{key}: no tasks; set tasks, e.g. ('lee',).")
        for pattern in settings.patterns:
            parse_pattern(pattern)
        for scorer in settings.scorers:
            check_scorer(key, settings, scorer)
        for name in ("batch_size", "max_length", "word_max_length", "lm_length", "lm_blocks",
                     "labels_per_class"):
            if settings[name] <= 0:
                raise ValueError(f"models.{key}.{name} must be positive, got {settings[name]}.")
        check_examples(key, settings)
        check_dtype(key, settings)
        check_multiple_choice(key, settings)
        check_held_out(key, settings)
        family = family_name(model_type(settings))
        for task_name in settings.tasks:
            try:
                task = task_registry.get(task_name)
            except ValueError as error:
                raise ValueError(f"models.{key}.tasks: {error}") from None
            if task.protocol == "finetune":
                finetune_config(task_name, settings)
            if family not in HEAD_FAMILIES[task.head]:
                raise ValueError(
                    f"models.{key}: task {task_name!r} needs a model of kind {task.head!r} "
                    f"({'/'.join(HEAD_FAMILIES[task.head])}), but {settings.name or 'tiny'!r} is "
                    f"a {family} model."
                )
        heads = {task_registry.get(t).head for t in settings.tasks}
        protocols = {task_registry.get(t).protocol for t in settings.tasks}
        if len(protocols) > 1:
            raise ValueError(
                f"models.{key}: tasks {list(settings.tasks)} mix zero-shot and fine-tune tasks;"
                " split them into two model entries."
            )
        if len(heads) > 1:
            raise ValueError(
                f"models.{key}: tasks {list(settings.tasks)} need different heads {sorted(heads)};"
                " split them into two model entries."
            )
        check_seeds(key, settings, protocols.pop())
        image_normalisation(settings)
        families[key] = family
    check_mesh(config)
    return families
