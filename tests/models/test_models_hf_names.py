"""Hugging Face name maps: validated assignment, optional tensors, prefixes and export."""

import numpy as np
import pytest
from flax import nnx

from es_jax.models import hf_names, layers


def test_assign_refuses_a_shape_mismatch_and_assigns_nothing():
    module = layers.Mlp(4, 8, rngs=nnx.Rngs(0))
    specs = hf_names.linear_specs("fc1", ("up",)) + hf_names.linear_specs("fc2", ("down",))
    before = np.asarray(module.up.kernel[...]).copy()
    tensors = {
        "fc1.weight": np.ones((8, 4), np.float32),
        "fc1.bias": np.ones((8,), np.float32),
        "fc2.weight": np.ones((4, 9), np.float32),
        "fc2.bias": np.ones((4,), np.float32),
    }
    with pytest.raises(ValueError, match=r"fc2\.weight.*\(4, 9\).*\(4, 8\)"):
        hf_names.assign_hf_tensors(module, specs, tensors, family="test")
    np.testing.assert_array_equal(np.asarray(module.up.kernel[...]), before)


def test_assign_names_missing_keys_and_skips_optional_ones():
    module = layers.Mlp(4, 8, rngs=nnx.Rngs(0))
    specs = hf_names.linear_specs("fc1", ("up",)) + hf_names.linear_specs(
        "fc2", ("down",), optional=True
    )
    with pytest.raises(ValueError, match=r"fc1\.bias"):
        hf_names.assign_hf_tensors(
            module, specs, {"fc1.weight": np.ones((8, 4), np.float32)}, family="test"
        )
    tensors = {"fc1.weight": np.full((8, 4), 2.0, np.float32), "fc1.bias": np.zeros(8, np.float32)}
    hf_names.assign_hf_tensors(module, specs, tensors, family="test")
    np.testing.assert_array_equal(np.asarray(module.up.kernel[...]), np.full((4, 8), 2.0))


def test_collect_inverts_assign():
    module = layers.Mlp(4, 8, rngs=nnx.Rngs(3))
    specs = hf_names.linear_specs("fc1", ("up",))
    exported = hf_names.collect_hf_tensors(module, specs)
    assert exported["fc1.weight"].shape == (8, 4)
    clone = layers.Mlp(4, 8, rngs=nnx.Rngs(4))
    hf_names.assign_hf_tensors(clone, specs, exported, family="test")
    np.testing.assert_array_equal(clone.up.kernel[...], module.up.kernel[...])


def test_nested_specs_sit_under_the_attribute_and_accept_bare_names():
    (kernel,) = hf_names.nested(hf_names.linear_specs("dense", ("dense",), bias=False), "bert")
    assert kernel.path == ("bert", "dense", "kernel")
    assert kernel.hf_name == "bert.dense.weight"
    assert kernel.aliases == ("dense.weight",)


def test_accept_prefixed_keeps_the_bare_name_and_accepts_prefixed_aliases():
    scale, _ = hf_names.accept_prefixed(hf_names.norm_specs("norm", ("norm",)), "vit.")
    assert scale.hf_name == "norm.weight"
    assert scale.aliases == ("norm.gamma", "vit.norm.weight", "vit.norm.gamma")
