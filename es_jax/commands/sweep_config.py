"""Configuration and validation of `es-jax sweep`: the config, its overrides, and the checks.

The embedded default config (`default_config()`) and one model entry's settings
(`model_settings()`), loading a Python config file (`FILE` or `FILE:tiny`, shrunk to a smoke run
of tiny random models), `--config.KEY=VALUE` overrides typed like the values they replace, and
the command line; then everything that can be checked before any work starts: sparsity patterns
(global, layerwise, N:M), the grid, scorers, each model's family against the kind of model its
tasks need, and fine-tune settings, so a bad config fails with a ValueError up front.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections

from es_jax.analysis import essential
from es_jax.evaluate import tasks as task_registry

SCORERS = ("magnitude", "wanda", "random")
NAMED_PATTERNS = ("global", "layerwise")
N_OF_M = re.compile(r"^(\d+):(\d+)$")
FREE_FORM = ("tiny", "finetune")  # model settings whose keys are not fixed in advance
# Families by the model kind a task needs (see tasks.ENCODER etc.).
HEAD_FAMILIES = {
    task_registry.ENCODER: ("bert",),
    task_registry.CAUSAL_LM: ("llama", "opt"),
    task_registry.MASKED_LM: ("bert",),
    task_registry.CLASSIFIER: ("bert", "opt"),
    task_registry.IMAGE_CLASSIFIER: ("vit",),
    task_registry.QUESTION_ANSWERING: ("bert",),
}
# The `task` argument of `models.load` / a family's `build` for each model kind.
HEAD_TASK = {
    task_registry.ENCODER: None,
    task_registry.CAUSAL_LM: "causal_lm",
    task_registry.MASKED_LM: "mlm",
    task_registry.CLASSIFIER: "classification",
    task_registry.IMAGE_CLASSIFIER: "classification",
    task_registry.QUESTION_ANSWERING: "qa",
}


# ----------------------------------------------------------------------------------------------
# Configuration.


def model_settings(**overrides: Any) -> ml_collections.ConfigDict:
    """One model's entry of `config.models`: what to load, which tasks, scorers and patterns."""
    settings = ml_collections.ConfigDict(
        {
            "name": "",  # bundled name ("minilm", "smollm2"), local HF folder, .gguf or hub id
            # HF config.json fields of a random tiny model used instead of `name` (tests, smoke
            # runs): e.g. {"model_type": "bert", "hidden_size": 32, ...}. Empty = load `name`.
            "tiny": ml_collections.ConfigDict(),
            "tokenizer": "minilm",  # the tokenizer of a tiny model (a bundled name or folder)
            "tasks": (),
            "scorers": ("magnitude",),
            "patterns": ("global",),
            "batch_size": 16,
            "max_length": 256,  # tokens per document (Lee) or sentence
            "word_max_length": 16,  # tokens per word (WordSim-353, SimLex-999)
            "max_examples": 0,  # keep the first N documents / pairs (0 = all)
            "lm_length": 256,  # tokens per block of the fixed Wikipedia text
            "lm_blocks": 16,  # blocks of the fixed Wikipedia text (perplexity, MLM loss)
            "calibration_blocks": 8,  # Wanda calibration: blocks of Lee background news
            "calibration_length": 256,
            # Fine-tune tasks (GLUE, SQuAD, CIFAR): overrides of the paper's Table 1 settings
            # (es_jax.train.finetune.FinetuneConfig fields, e.g. total_steps, learning_rate).
            "finetune": ml_collections.ConfigDict(),
            "max_train_examples": 0,  # keep the first N training examples (0 = all)
            "doc_stride": 128,  # SQuAD windows
            "image_size": 224,  # vision: images are resized to this square size
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


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a Python config file; `FILE:ARG` calls `get_config(ARG)` (e.g. tiny)."""
    file_name, _, argument = path.partition(":")
    file = Path(file_name)
    if not file.is_file():
        raise ValueError(f"--config {file_name}: no such file.")
    spec = importlib.util.spec_from_file_location(f"es_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {path}: the file defines no get_config().")
    return module.get_config(argument) if argument else module.get_config()


# Random tiny models of each family (HF config.json fields), for tests and smoke runs. Text
# models use the bundled MiniLM tokenizer's vocabulary.
TINY_MODELS = {
    "bert": {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
    },
    "opt": {
        "model_type": "opt",
        "vocab_size": 30522,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "ffn_dim": 64,
        "max_position_embeddings": 128,
        "word_embed_proj_dim": 32,
        "do_layer_norm_before": True,
        "pad_token_id": 0,
    },
    "llama": {
        "model_type": "llama",
        "vocab_size": 30522,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
    },
    "vit": {
        "model_type": "vit",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 8,
    },
}


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
    training steps, a few examples, the first task and pattern of each model entry, and one
    entry per distinct (family, model kind, pattern kind)."""
    config.grid = (0.0, 0.5)
    config.plot_sparsity = 0.5
    seen = set()
    for key, family in family_of_entry.items():
        settings = config.models[key]
        kind = (
            family,
            task_registry.get(settings.tasks[0]).head,
            parse_pattern(settings.patterns[0]).is_n_of_m,
        )
        if kind in seen:
            del config.models[key]
            continue
        seen.add(kind)
        settings.tiny = ml_collections.ConfigDict(TINY_MODELS[family])
        settings.tasks = settings.tasks[:1]
        settings.patterns = settings.patterns[:1]
        settings.max_examples = 8
        settings.max_train_examples = 16
        settings.batch_size = 4
        settings.max_length = 32
        settings.lm_length = 32
        settings.lm_blocks = 4
        settings.calibration_blocks = 2
        settings.calibration_length = 32
        settings.image_size = 32
        settings.finetune = ml_collections.ConfigDict(
            {"total_steps": 2, "batch_size": 4, "num_epochs": 1}
        )


def _parse_value(text: str, current: Any) -> Any:
    """An override's value, read with the type of the value it replaces."""
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, tuple | list):
        if isinstance(value, tuple | list):
            return tuple(value)
        items = [item.strip() for item in text.split(",") if item.strip()]
        parsed = []
        for item in items:
            try:
                parsed.append(ast.literal_eval(item))
            except (ValueError, SyntaxError):
                parsed.append(item)
        return tuple(parsed)
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    return value


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets `config.<dotted> = text` (typed like the old value); ValueError on unknown keys."""
    keys = dotted.split(".")
    node = config
    for i, key in enumerate(keys[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            raise ValueError(f"unknown config key {'.'.join(keys[: i + 1])!r} in --config.{dotted}")
        node = node[key]
    last = keys[-1]
    free_form = len(keys) >= 2 and keys[-2] in FREE_FORM
    if not isinstance(node, ml_collections.ConfigDict) or (last not in node and not free_form):
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ValueError(f"unknown config key {dotted!r}; known keys here: {known}.")
    current = node.get(last, None)
    try:
        value = _parse_value(text, current) if current is not None else ast.literal_eval(text)
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"--config.{dotted}={text}: {error}") from error
    try:
        node[last] = value
    except TypeError as error:
        raise ValueError(f"--config.{dotted}={text}: {error}") from error


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, Path]:
    """The config (file or default, with overrides) and the workdir from the command line."""
    parser = argparse.ArgumentParser(
        prog="es-jax sweep",
        description="One-shot pruning sweep and essential sparsity (see docs/sweep.md).",
        epilog="Override any config key with --config.KEY=VALUE, e.g. --config.grid=0.0,0.5",
    )
    parser.add_argument("--config", default=None, help="ml_collections config file (get_config)")
    parser.add_argument("--workdir", default="runs/sweep", help="where results and plots go")
    known, rest = parser.parse_known_args(list(argv))
    overrides = []
    for arg in rest:
        if not arg.startswith("--config.") or "=" not in arg:
            parser.error(f"unrecognised argument {arg!r}; overrides look like --config.KEY=VALUE")
        dotted, _, text = arg[len("--config.") :].partition("=")
        overrides.append((dotted, text))
    config = load_config_file(known.config) if known.config else default_config()
    for dotted, text in overrides:
        apply_override(config, dotted, text)
    return config, Path(known.workdir)


# ----------------------------------------------------------------------------------------------
# Validation: everything that can be checked before any work starts.


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: global or layerwise unstructured, or N:M (keep n of every m)."""

    name: str
    n: int = 0
    m: int = 0

    @property
    def is_n_of_m(self) -> bool:
        """True for an N:M pattern."""
        return self.m > 0


def parse_pattern(text: str) -> Pattern:
    """A Pattern from "global", "layerwise" or "N:M" (e.g. "2:4"); ValueError otherwise."""
    if text in NAMED_PATTERNS:
        return Pattern(text)
    match = N_OF_M.match(text)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"pattern {text!r}: N:M needs 0 < N < M (keep N of every M).")
        return Pattern(text, n, m)
    raise ValueError(f"unknown pattern {text!r}; use 'global', 'layerwise' or N:M such as '2:4'.")


def check_grid(grid: Sequence[float], where: str = "grid") -> tuple[float, ...]:
    """The grid as sorted unique floats in [0, 1); ValueError if empty or out of range."""
    values = tuple(sorted({float(s) for s in grid}))
    if not values:
        raise ValueError(f"{where} is empty; give sparsities such as 0.0,0.1,...,0.9.")
    bad = [s for s in values if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(f"{where} has sparsities outside [0, 1): {bad}; use values like 0.5.")
    return values


def model_type(settings: ml_collections.ConfigDict) -> str:
    """The HF model_type of a model entry, read without loading weights."""
    from es_jax.models import hub

    if len(settings.tiny):
        if "model_type" not in settings.tiny:
            raise ValueError("a tiny model config needs a 'model_type' (bert, llama, opt, vit).")
        return settings.tiny.model_type
    if not settings.name:
        raise ValueError("a model entry needs a 'name' (bundled name, folder, .gguf or hub id).")
    location = hub.resolve(settings.name, None)
    if location.suffix == ".gguf":
        return "llama"
    return str(hub.read_config(location).get("model_type"))


def family_name(model_type_name: str) -> str:
    """The es_jax family ("bert", "llama", ...) handling an HF model_type."""
    from es_jax.models import hub

    return hub.family_for(model_type_name).__name__.rsplit(".", 1)[-1]


def paper_task(task_name: str) -> str:
    """The key of a fine-tune task in the paper's Table 1 (mnli, squad, cifar10, ...)."""
    if task_name.startswith("glue/"):
        return task_name.split("/", 1)[1]
    return task_name.split("/", 1)[0]


def finetune_config(task_name: str, settings: Any) -> Any:
    """The paper's fine-tuning settings for a task, with the model entry's overrides."""
    from es_jax.train import finetune

    overrides = settings.finetune.to_dict()
    if overrides.get("total_steps") == 0:
        overrides["total_steps"] = None
    return finetune.finetune_config(paper_task(task_name), **overrides)


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
            if scorer not in SCORERS:
                raise ValueError(f"models.{key}: unknown scorer {scorer!r}; use one of {SCORERS}.")
        for name in ("batch_size", "max_length", "word_max_length", "lm_length", "lm_blocks"):
            if settings[name] <= 0:
                raise ValueError(f"models.{key}.{name} must be positive, got {settings[name]}.")
        family = family_name(model_type(settings))
        for task_name in settings.tasks:
            task = task_registry.get(task_name)
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
        families[key] = family
    return families
