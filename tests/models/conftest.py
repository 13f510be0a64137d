"""Fixtures shared by the model tests: a tiny BERT config, BERT's HF module names, and the check
that a refused checkpoint leaves the model as it was."""

from collections.abc import Callable, Mapping
from types import MappingProxyType

import jax
import numpy as np
import pytest
from flax import nnx

from es_jax import models


@pytest.fixture(scope="session")
def tiny_bert() -> Mapping:
    """The Hugging Face config fields of a tiny BERT (read-only): 2 layers, hidden size 32."""
    return MappingProxyType(
        dict(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=40,
            type_vocab_size=2,
        )
    )


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
