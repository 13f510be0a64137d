"""Fixtures shared by the model tests: a tiny BERT config, BERT's HF module names, and the check
that a refused checkpoint leaves the model as it was."""

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx

from es_jax import models


@pytest.fixture(scope="session")
def tiny_bert() -> Mapping:
    """The Hugging Face config fields of a tiny BERT (read-only): 2 layers, hidden size 32."""
    fields = {**models.TINY_HF_CONFIGS["bert"], "vocab_size": 97, "num_attention_heads": 4}
    fields.pop("model_type")
    return MappingProxyType({**fields, "max_position_embeddings": 40, "type_vocab_size": 2})


@pytest.fixture(scope="session")
def bert_hf_modules() -> Mapping[str, str]:
    """{component of a BERT block: the transformers module holding the same weights}."""
    return MappingProxyType(
        {
            "attention/query": "attention.self.query",
            "attention/key": "attention.self.key",
            "attention/value": "attention.self.value",
            "attention/out": "attention.output.dense",
            "mlp/up": "intermediate.dense",
            "mlp/down": "output.dense",
        }
    )


@pytest.fixture(scope="session")
def assert_refused_untouched() -> Callable[[nnx.Module, dict, str], None]:
    """A check that loading `tensors` into `model` raises a ValueError matching `match` and leaves
    every parameter as it was."""

    def check(model: nnx.Module, tensors: dict, match: str) -> None:
        before = [np.array(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))]
        with pytest.raises(ValueError, match=match):
            models.family_of(model).load_hf_tensors(model, tensors)
        after = jax.tree.leaves(nnx.state(model, nnx.Param))
        for old, new in zip(before, after, strict=True):
            np.testing.assert_array_equal(old, np.asarray(new))

    return check


@pytest.fixture(scope="session")
def assert_config_round_trips() -> Callable[[Any, type, Mapping], None]:
    """A check that a family's config goes to transformers' config class and back unchanged."""

    def check(family: Any, hf_class: type, fields: Mapping) -> None:
        config = family.config_from_hf(dict(fields))
        hf = hf_class(**family.config_to_hf(config)).to_dict()
        assert family.config_from_hf(hf) == config

    return check
