"""The contract every model family module (`bert`, `vit`, `opt`, `llama`) fulfils.

A family is a module, not a class: `isinstance(models.bert, Family)` holds because the module
defines every member of `Family`. A family knows its own parameter names, so code outside `models/`
asks it what a path means (`layer_of`, `component_of`) instead of spelling those names in regexes.
`block_paths` writes both readers once for every family, from where its blocks live.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
from flax import nnx

from es_jax.models.hf_names import WeightSpec


@runtime_checkable
class Family(Protocol):
    """A model family module: its HF model types, target set, heads, config, weights and paths."""

    MODEL_TYPES: tuple[str, ...]
    """The Hugging Face config.json `model_type` values the family loads."""

    PRUNABLE: str
    """The paper's target set as a regex matched in full against '/'-joined parameter paths: the
    attention q, k, v, out and feed-forward kernels of every block (no embeddings, norms, biases,
    pooler or heads), with any prefix a task model puts before the blocks."""

    SIGNATURE: str
    """A regex matched in full by a parameter path that only this family's models have (their input
    embedding); it tells apart families whose PRUNABLE coincide (BERT and ViT)."""

    TASKS: tuple[str, ...]
    """The task heads `build` accepts besides None ("mlm", "classification", "qa", "causal_lm")."""

    def config_from_hf(self, hf: dict) -> Any:
        """The family's config dataclass from an HF config.json dict; unknown fields are ignored,
        an unsupported variant is refused with a ValueError."""

    def config_to_hf(self, config: Any) -> dict:
        """The HF config.json dict of a config, "model_type" included."""

    def build(
        self, config: Any, task: str | None, *, rngs: nnx.Rngs, num_labels: int = 2
    ) -> nnx.Module:
        """The model for `task`: None for the checkpoint's natural model (the encoder or backbone,
        the causal LM for decoders), else one of `TASKS`; ValueError naming the choices otherwise.
        The model keeps `config` as `model.config` (and `num_labels` on classifiers); its class is
        named after the transformers class it mirrors."""

    def weight_specs(self, model: Any) -> list[WeightSpec]:
        """The HF <-> NNX name map of every tensor of `model`, a model this family built."""

    def load_hf_tensors(self, model: Any, tensors: dict[str, np.ndarray]) -> None:
        """Fills `model` in place from an HF state dict, after validating every name and shape;
        ValueError naming the missing keys, or a key and both shapes, and nothing assigned."""

    def export_hf_tensors(self, model: Any) -> dict[str, np.ndarray]:
        """The HF state dict of `model` (float32, PyTorch layouts) that transformers loads."""

    def layer_of(self, path: str) -> int | None:
        """The index of the block a parameter path lies in
        (`encoder/layers/3/attention/query/kernel` -> 3), None for a path outside the blocks."""

    def component_of(self, path: str) -> str:
        """The module of a block parameter within its block
        (`encoder/layers/3/attention/query/kernel` -> `attention/query`); else the path itself."""


class BlockPaths(NamedTuple):
    """A family's path readers: `layer_of` and `component_of` (see `Family`)."""

    layer_of: Callable[[str], int | None]
    component_of: Callable[[str], str]


def block_paths(blocks: str) -> BlockPaths:
    """The path readers of a family whose blocks are the list at `blocks` (e.g. "model/layers"),
    below any prefix a task model adds (`bert/encoder/layers/...`)."""
    pattern = re.compile(rf"(?:.*/)?{re.escape(blocks)}/(\d+)/(.+)")

    def layer_of(path: str) -> int | None:
        """The index of the block `path` lies in, None for a path outside the blocks."""
        match = pattern.fullmatch(path)
        return None if match is None else int(match.group(1))

    def component_of(path: str) -> str:
        """The module of a block parameter within its block (`attention/query`), else `path`."""
        match = pattern.fullmatch(path)
        return path if match is None else match.group(2).rsplit("/", 1)[0]

    return BlockPaths(layer_of, component_of)


def unknown_task(family_name: str, task: str | None, tasks: tuple[str, ...]) -> ValueError:
    """The error `build` raises for a task the family has no head for."""
    return ValueError(f"{family_name} has no task {task!r}; choose None or one of {tasks}.")
