"""`es-jax sweep`: prune a pre-trained model in one shot at a grid of sparsities and evaluate each.

For every model of the config: load it once, build one jitted evaluator per task (compiled once for
all levels), evaluate dense, then for each scorer (magnitude, Wanda, random) compute the scores
once and, for each pattern (global, layerwise, N:M), the nested masks of every level from that one
selection; apply each mask and evaluate every task on the pruned parameters. Each finished level is
written to `WORKDIR/results.json` atomically as soon as it is done, so a crash loses none and a
re-run skips finished levels. At the end: essential sparsity and knee per run, a CSV, and plots.

    es-jax sweep [--config FILE] [--config.key=value ...] [--workdir DIR]

With no `--config` the embedded default (`default_config()`) runs offline on the bundled models.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import importlib.util
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from es_jax.analysis import essential
from es_jax.evaluate import tasks as task_registry
from es_jax.evaluate.evaluators import Evaluator, split_params

SCHEMA_VERSION = 1
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


# ----------------------------------------------------------------------------------------------
# Results: a JSON file rewritten atomically after every level.


def fingerprint(key: str, settings: ml_collections.ConfigDict, config: Any) -> str:
    """A hash of everything that changes a level's value (not tasks/scorers/patterns lists)."""
    relevant = settings.to_dict()
    for name in ("tasks", "scorers", "patterns"):
        relevant.pop(name)
    relevant.update(key=key, seed=config.seed, data_dir=config.data_dir)
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_id(model: str, task: str, pattern: str, scorer: str) -> str:
    """The identity of one curve: model/task/pattern/scorer."""
    return f"{model}|{task}|{pattern}|{scorer}"


def write_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


class ResultsStore:
    """The sweep's results.json: runs keyed by run_id, saved after every change."""

    def __init__(self, workdir: Path, config: ml_collections.ConfigDict):
        self.path = workdir / "results.json"
        self.config = config
        self.runs: dict[str, dict] = {}
        self.compilations: dict[str, int] = {}
        if self.path.is_file():
            previous = json.loads(self.path.read_text())
            self.runs = {r["id"]: r for r in previous.get("runs", [])}

    def run(self, model: str, task: Any, pattern: str, scorer: str, stamp: str) -> dict:
        """The run record, created (or reset when its fingerprint changed) on first use."""
        rid = run_id(model, task.name, pattern, scorer)
        record = self.runs.get(rid)
        if record is None or record.get("fingerprint") != stamp:
            record = {
                "id": rid,
                "model": model,
                "task": task.name,
                "metric": task.metric,
                "higher_is_better": task.higher_is_better,
                "pattern": pattern,
                "scorer": scorer,
                "protocol": task.protocol,
                "dense": None,
                "levels": [],
                "fingerprint": stamp,
            }
            self.runs[rid] = record
        return record

    def save(self) -> None:
        """Rewrites results.json atomically."""
        document = {
            "schema_version": SCHEMA_VERSION,
            "config": self.config.to_dict(),
            "compilations": self.compilations,
            "runs": list(self.runs.values()),
        }
        write_atomically(self.path, json.dumps(document, indent=1, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    """JSON for numpy scalars and tuples inside the config."""
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def level_of(record: dict, sparsity: float) -> dict | None:
    """The record's level at this sparsity, if already done."""
    for level in record["levels"]:
        if abs(level["sparsity"] - sparsity) < 1e-9:
            return level
    return None


def finalise(record: dict, epsilon_config: Any) -> dict:
    """Adds drops, essential sparsity, knee and epsilon to a run record (in place)."""
    eps = essential.default_epsilon(
        record["metric"], epsilon_config.absolute, epsilon_config.relative
    )
    tolerance = eps.tolerance(record["dense"])
    record["levels"].sort(key=lambda level: level["sparsity"])
    for level in record["levels"]:
        level["drop"] = essential.drop(level["value"], record["dense"], record["higher_is_better"])
    sparsities = [level["sparsity"] for level in record["levels"]]
    drops = [level["drop"] for level in record["levels"]]
    record["epsilon"] = eps.as_dict()
    record["tolerance"] = tolerance
    record["essential_sparsity"] = essential.essential_sparsity(sparsities, drops, tolerance)
    record["knee"] = essential.knee(sparsities, drops, tolerance)
    return record


CSV_FIELDS = (
    "model",
    "task",
    "pattern",
    "scorer",
    "metric",
    "sparsity",
    "measured_sparsity",
    "model_sparsity",
    "value",
    "dense",
    "drop",
    "essential_sparsity",
)


def write_csv(runs: Sequence[dict], path: Path) -> None:
    """One row per (run, level)."""
    rows = []
    for run in runs:
        for level in run["levels"]:
            rows.append({**{k: run[k] for k in CSV_FIELDS if k in run}, **level})
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def summary_table(runs: Sequence[dict]) -> str:
    """A Markdown table: dense value, essential sparsity and knee of every run."""
    lines = [
        "| model | task | metric | pattern | scorer | dense | essential sparsity | knee |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        knee = "-" if run.get("knee") is None else f"{100 * run['knee']:.0f}%"
        lines.append(
            f"| {run['model']} | {run['task']} | {run['metric']} | {run['pattern']} | "
            f"{run['scorer']} | {run['dense']:.2f} | {100 * run['essential_sparsity']:.0f}% | "
            f"{knee} |"
        )
    return "\n".join(lines)


def levels_table(runs: Sequence[dict]) -> str:
    """A Markdown table of every level's value per run (columns: sparsities)."""
    sparsities = sorted({level["sparsity"] for run in runs for level in run["levels"]})
    header = "| run | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |"
    lines = [header, "|---|" + "---|" * len(sparsities)]
    for run in runs:
        values = {level["sparsity"]: level["value"] for level in run["levels"]}
        cells = [f"{values[s]:.2f}" if s in values else "" for s in sparsities]
        name = f"{run['model']}/{run['task']}/{run['pattern']}/{run['scorer']}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Models, scores and masks.


def task_settings(config: Any, settings: Any) -> task_registry.TaskSettings:
    """The data and batching settings a task builder needs."""
    return task_registry.TaskSettings(
        data_dir=config.data_dir,
        seed=config.seed,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        word_max_length=settings.word_max_length,
        max_examples=settings.max_examples,
        lm_length=settings.lm_length,
        lm_blocks=settings.lm_blocks,
    )


def load_model(
    settings: Any, head: str, seed: int, num_labels: int | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer): the named checkpoint, or a random tiny model of `settings.tiny`.

    A new head (classification, QA) is initialised from `seed`, the same at every level.
    """
    from flax import nnx

    from es_jax import models
    from es_jax.models import hub

    task = HEAD_TASK[head]
    if not len(settings.tiny):
        return models.load(settings.name, task=task, num_labels=num_labels, seed=seed)
    hf_config = settings.tiny.to_dict()
    family = hub.family_for(hf_config["model_type"])
    model = family.build(
        family.config_from_hf(hf_config), task, rngs=nnx.Rngs(seed), num_labels=num_labels or 2
    )
    model.eval()
    if family.__name__.endswith(".vit"):
        return model, None
    tokenizer = hub.read_tokenizer(hub.resolve(settings.tokenizer, None))
    return model, tokenizer


def calibration_batches(tokenizer: Any, config: Any, settings: Any) -> list[dict]:
    """Wanda calibration inputs: blocks of Lee background news (not the evaluation text)."""
    from es_jax import data

    documents = data.documents("lee_background", config.data_dir or None)
    blocks = task_registry.lm_blocks(
        documents,
        tokenizer,
        settings.calibration_length,
        settings.calibration_blocks,
        settings.batch_size,
    )
    return [{k: b[k] for k in ("input_ids", "attention_mask")} for b in blocks]


def scores_of(
    scorer: str, model: Any, params: Any, where: str, tokenizer: Any, config: Any, settings: Any
) -> Any:
    """Pruning scores of the target weights: |W|, Wanda's |W| * ||X||, or random."""
    from es_jax import models, pruning

    if scorer == "magnitude":
        return pruning.magnitude(params, where=where)
    if scorer == "random":
        return pruning.random_scores(params, jax.random.key(config.seed), where=where)
    norms = models.activation_norms(model, calibration_batches(tokenizer, config, settings))
    return pruning.wanda(params, norms, where=where)


def masks_of(scores: Any, pattern: Pattern, sparsities: Sequence[float]) -> list[Any]:
    """One mask per sparsity: nested unstructured masks from one selection, or one N:M mask."""
    from es_jax import pruning

    if not sparsities:
        return []
    if pattern.is_n_of_m:
        return [pruning.n_of_m(scores, n=pattern.n, m=pattern.m)]
    return pruning.unstructured(scores, list(sparsities), scope=pattern.name)


def pattern_levels(pattern: Pattern, grid: Sequence[float]) -> list[float]:
    """The pruned levels of a pattern: the grid's non-zero sparsities, or 1 - N/M."""
    if pattern.is_n_of_m:
        return [round(1.0 - pattern.n / pattern.m, 6)]
    return [s for s in grid if s > 0.0]


# ----------------------------------------------------------------------------------------------
# The sweep.


@dataclass
class ModelRun:
    """One loaded model with its evaluators, parameters, target selector and level scoring."""

    key: str
    model: Any
    tokenizer: Any
    params: Any
    where: str
    evaluators: dict[str, Evaluator]
    # value(task, pruned params, mask or None for dense) -> metric; fine-tunes first if needed
    value: Callable[[str, Any, Any], float]


def prepare(key: str, settings: Any, config: Any, task_names: Sequence[str]) -> ModelRun:
    """Loads a model and builds one evaluator per task (data tokenised once)."""
    from es_jax import models

    if task_registry.get(task_names[0]).protocol == "finetune":
        return prepare_finetune(key, settings, config, task_names[0])
    head = task_registry.get(task_names[0]).head
    model, tokenizer = load_model(settings, head, config.seed)
    built = {
        name: task_registry.build_zero_shot(name, model, tokenizer, task_settings(config, settings))
        for name in task_names
    }
    _, params, _ = split_params(model)

    def value(name: str, pruned: Any, mask: Any) -> float:
        return built[name](pruned)

    return ModelRun(key, model, tokenizer, params, models.prunable(model), built, value)


def prepare_finetune(key: str, settings: Any, config: Any, task_name: str) -> ModelRun:
    """A fine-tune task: every level fine-tunes the pre-trained model with its mask fixed.

    The pre-trained weights, the new head's initialisation, the dropout stream and the data
    order are the same at every level (es_jax.train.finetune); only the mask differs.
    """
    from flax import nnx

    from es_jax import models
    from es_jax.train import finetune

    task = task_registry.get(task_name)
    ft_config = finetune_config(task_name, settings)
    model, tokenizer = load_model(
        settings, task.head, config.seed, task_registry.num_labels(task_name)
    )
    data = task_registry.build_finetune(
        task_name,
        model,
        tokenizer,
        task_registry.FinetuneSettings(
            data_dir=config.data_dir,
            seed=config.seed,
            batch_size=settings.batch_size,
            train_batch_size=ft_config.batch_size,
            num_epochs=ft_config.num_epochs,
            max_length=settings.max_length,
            max_examples=settings.max_examples,
            max_train_examples=settings.max_train_examples,
            doc_stride=settings.doc_stride,
            image_size=settings.image_size,
        ),
    )
    graphdef, params, rest = split_params(model)

    def value(name: str, pruned: Any, mask: Any) -> float:
        trained, _ = finetune.finetune(
            lambda rngs: nnx.merge(graphdef, params, rest), mask, data.train, ft_config, config.seed
        )
        return data.evaluator(nnx.state(trained, nnx.Param))

    evaluators = {task_name: data.evaluator}
    return ModelRun(key, model, tokenizer, params, models.prunable(model), evaluators, value)


def measured(params: Any, where: str) -> tuple[float, float]:
    """Sparsity of the target set and of the whole model."""
    from es_jax import pruning

    report = pruning.report(params, where=where)
    return float(report["target"]["sparsity"]), float(report["model"]["sparsity"])


def todo_count(store: ResultsStore, config: Any) -> int:
    """Evaluations left on the grid: dense per (model, task) plus every unfinished level."""
    total = 0
    for key, settings in config.models.items():
        stamp = fingerprint(key, settings, config)
        total += len(settings.tasks)
        for task_name in settings.tasks:
            for scorer in settings.scorers:
                for pattern_text in settings.patterns:
                    record = store.runs.get(run_id(key, task_name, pattern_text, scorer))
                    fresh = record is None or record.get("fingerprint") != stamp
                    for sparsity in pattern_levels(parse_pattern(pattern_text), config.grid):
                        total += fresh or level_of(record, sparsity) is None
    return total


def refinement_of(record: dict, pattern: Pattern, config: Any) -> list[float]:
    """The refinement levels a run asks for, from its grid levels so far (none for N:M)."""
    if not config.refine or pattern.is_n_of_m or record["dense"] is None:
        return []
    coarse = {
        **record,
        "levels": [dict(lv) for lv in record["levels"] if lv["sparsity"] in config.grid],
    }
    found = finalise(coarse, config.epsilon)["essential_sparsity"]
    return essential.refinement_levels(config.grid, found, config.refine)


def model_is_done(
    store: ResultsStore,
    key: str,
    settings: Any,
    config: Any,
    task_names: Sequence[str] | None = None,
) -> bool:
    """True when every level (refinements included) of these tasks' runs is stored."""
    stamp = fingerprint(key, settings, config)
    for task_name in settings.tasks if task_names is None else task_names:
        for scorer in settings.scorers:
            for pattern_text in settings.patterns:
                pattern = parse_pattern(pattern_text)
                record = store.runs.get(run_id(key, task_name, pattern_text, scorer))
                if record is None or record.get("fingerprint") != stamp or record["dense"] is None:
                    return False
                levels = pattern_levels(pattern, config.grid)
                levels += refinement_of(record, pattern, config)
                if any(level_of(record, s) is None for s in levels):
                    return False
    return True


@dataclass
class LevelContext:
    """What evaluating levels of one (model, scorer, pattern) needs."""

    prepared: ModelRun
    records: dict[str, dict]
    store: ResultsStore
    bar: tqdm
    apply: Any
    label: str


def evaluate_levels(context: LevelContext, masks: Sequence[Any], todo: dict[float, list]) -> None:
    """Applies each mask and evaluates the listed tasks; saves after every level."""
    prepared = context.prepared
    for (sparsity, names), mask in zip(todo.items(), masks, strict=True):
        pruned = context.apply(prepared.params, mask)
        target_sparsity, model_sparsity = measured(pruned, prepared.where)
        for name in names:
            context.bar.set_description(f"{prepared.key}/{name} {context.label} {sparsity:.2f}")
            context.records[name]["levels"].append(
                {
                    "sparsity": sparsity,
                    "measured_sparsity": target_sparsity,
                    "model_sparsity": model_sparsity,
                    "value": prepared.value(name, pruned, mask),
                }
            )
            context.store.save()
            context.bar.update(1)


def dense_values(
    prepared: ModelRun, settings: Any, store: ResultsStore, stamp: str, bar: tqdm
) -> dict[str, float]:
    """The dense metric of every task (reused from any stored run with the same fingerprint)."""
    values = {}
    for name in prepared.evaluators:
        cached = [
            record["dense"]
            for p in settings.patterns
            for s in settings.scorers
            if (record := store.runs.get(run_id(prepared.key, name, p, s)))
            and record["fingerprint"] == stamp
            and record["dense"] is not None
        ]
        bar.set_description(f"{prepared.key}/{name} dense")
        values[name] = cached[0] if cached else prepared.value(name, prepared.params, None)
        bar.update(1)
    return values


def open_records(
    prepared: ModelRun,
    store: ResultsStore,
    pattern_text: str,
    scorer: str,
    stamp: str,
    dense: dict[str, float],
    dense_sparsity: tuple[float, float],
    config: Any,
) -> dict[str, dict]:
    """The run records of one (scorer, pattern) for every task, with dense and level 0 filled."""
    records = {}
    for name, evaluator in prepared.evaluators.items():
        record = store.run(prepared.key, task_registry.get(name), pattern_text, scorer, stamp)
        record["dense"] = dense[name]
        record["num_examples"] = evaluator.num_examples
        if 0.0 in config.grid and level_of(record, 0.0) is None:
            record["levels"].append(
                {
                    "sparsity": 0.0,
                    "measured_sparsity": dense_sparsity[0],
                    "model_sparsity": dense_sparsity[1],
                    "value": dense[name],
                }
            )
        records[name] = record
    store.save()
    return records


def plot_level(config: Any) -> float:
    """The grid level nearest to `plot_sparsity` (above 0), whose mask the mask plots show."""
    levels = [s for s in config.grid if s > 0.0] or [config.plot_sparsity]
    return min(levels, key=lambda s: abs(s - config.plot_sparsity))


def sweep_model(
    key: str, settings: Any, config: Any, store: ResultsStore, bar: tqdm, workdir: Path
) -> None:
    """All runs of one model: zero-shot tasks share one load; each fine-tune task has its own."""
    zero_shot = task_registry.get(settings.tasks[0]).protocol == "zero_shot"
    groups = [tuple(settings.tasks)] if zero_shot else [(task,) for task in settings.tasks]
    for i, task_names in enumerate(groups):
        if model_is_done(store, key, settings, config, task_names):
            continue
        prepared = prepare(key, settings, config, task_names)
        sweep_prepared(prepared, settings, config, store, bar, workdir if i == 0 else None)


def sweep_prepared(
    prepared: ModelRun,
    settings: Any,
    config: Any,
    store: ResultsStore,
    bar: tqdm,
    plot_dir: Path | None,
) -> None:
    """Dense, then every scorer x pattern x level of the prepared tasks; mask plots if asked."""
    from es_jax import pruning

    key = prepared.key
    stamp = fingerprint(key, settings, config)
    dense_sparsity = measured(prepared.params, prepared.where)
    dense = dense_values(prepared, settings, store, stamp, bar)
    apply = jax.jit(pruning.apply)
    plot_scorer, plotted = settings.scorers[0], plot_dir is None
    unstructured = [p for p in map(parse_pattern, settings.patterns) if not p.is_n_of_m]
    plot_pattern = unstructured[0] if unstructured else Pattern("layerwise")
    for scorer in settings.scorers:
        bar.set_description(f"{key} {scorer} scores")
        scores = scores_of(
            scorer,
            prepared.model,
            prepared.params,
            prepared.where,
            prepared.tokenizer,
            config,
            settings,
        )
        for pattern_text in settings.patterns:
            pattern = parse_pattern(pattern_text)
            records = open_records(
                prepared, store, pattern_text, scorer, stamp, dense, dense_sparsity, config
            )
            context = LevelContext(prepared, records, store, bar, apply, f"{pattern_text}/{scorer}")
            todo = missing_levels(records, pattern_levels(pattern, config.grid))
            masks = masks_of(scores, pattern, list(todo))
            wanted = not plotted and scorer == plot_scorer and pattern == plot_pattern
            if wanted and plot_level(config) in todo:
                level_mask = masks[list(todo).index(plot_level(config))]
                plot_masks(prepared, level_mask, f"{plot_pattern.name} {scorer}", config, plot_dir)
                plotted = True
            evaluate_levels(context, masks, todo)
            del masks
            refine = {s: [] for r in records.values() for s in refinement_of(r, pattern, config)}
            todo = missing_levels(records, sorted(refine))
            bar.total += sum(len(names) for names in todo.values())
            evaluate_levels(context, masks_of(scores, pattern, list(todo)), todo)
        if scorer == plot_scorer and not plotted:
            (mask,) = masks_of(scores, plot_pattern, [plot_level(config)])
            plot_masks(prepared, mask, f"{plot_pattern.name} {scorer}", config, plot_dir)
            plotted = True
        del scores
    for name, evaluator in prepared.evaluators.items():
        store.compilations[f"{key}/{name}"] = evaluator.compilations()
    store.save()


def missing_levels(records: dict[str, dict], sparsities: Sequence[float]) -> dict[float, list]:
    """{sparsity: [tasks without that level]} for the sparsities some task still lacks."""
    todo = {}
    for sparsity in sparsities:
        names = [name for name, record in records.items() if level_of(record, sparsity) is None]
        if names:
            todo[sparsity] = names
    return todo


def plot_masks(
    prepared: ModelRun, mask: Any, scorer: str, config: Any, workdir: Path
) -> list[Path]:
    """Per-layer sparsity and the component view (paper's Figure 1) of one mask.

    `scorer` names the mask in the title, e.g. "global magnitude".
    """
    from es_jax import pruning
    from es_jax.analysis import plots

    report = pruning.report(pruning.apply(prepared.params, mask), where=prepared.where)
    leaf_sparsity = {
        path: float(leaf["sparsity"]) for path, leaf in report["leaves"].items() if leaf["target"]
    }
    title = f"{prepared.key}: {scorer} mask at {100 * plot_level(config):g}% sparsity"
    component_masks = {
        path: np.asarray(leaf)
        for path, leaf in zip(pruning.leaf_paths(mask), jax.tree.leaves(mask), strict=True)
    }
    return [
        plots.plot_layer_sparsity(leaf_sparsity, workdir / f"layers_{prepared.key}.png", title),
        plots.plot_component_masks(
            component_masks, workdir / f"components_{prepared.key}.png", title
        ),
    ]


def iter_models(config: Any) -> Iterator[tuple[str, Any]]:
    """(key, settings) of every model entry, in config order."""
    yield from config.models.items()


def run(config: ml_collections.ConfigDict, workdir: str | Path, progress: bool = True) -> dict:
    """Runs (or resumes) the sweep; writes results.json, results.csv and plots; returns results."""
    from es_jax.analysis import plots

    validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    store = ResultsStore(workdir, config)
    start = time.perf_counter()
    with tqdm(total=todo_count(store, config), disable=not progress, unit="eval") as bar:
        for key, settings in iter_models(config):
            if model_is_done(store, key, settings, config):
                continue
            sweep_model(key, settings, config, store, bar, workdir)
    wanted = {
        run_id(key, t, p, s)
        for key, settings in iter_models(config)
        for t in settings.tasks
        for p in settings.patterns
        for s in settings.scorers
    }
    runs = [finalise(store.runs[rid], config.epsilon) for rid in store.runs if rid in wanted]
    store.runs = {r["id"]: r for r in runs}
    store.save()
    write_csv(runs, workdir / "results.csv")
    plots.plot_drops(runs, workdir / "drops.png")
    (workdir / "summary.md").write_text(summary_table(runs) + "\n\n" + levels_table(runs) + "\n")
    results = json.loads(store.path.read_text())
    results["seconds"] = time.perf_counter() - start
    return results


def main(argv: list[str]) -> None:
    """`es-jax sweep` entry point."""
    try:
        config, workdir = parse_args(argv)
        results = run(config, workdir)
    except ValueError as error:
        raise SystemExit(f"es-jax sweep: {error}") from error
    print(summary_table(results["runs"]))
    print(f"\nresults: {workdir / 'results.json'}, {workdir / 'results.csv'}, plots in {workdir}")
