"""The family contract: every family module is a `models.Family`, says what its parameter paths
mean (block index, component), names every parameter once, and is found from a tree's paths."""

import re

import pytest
from flax import nnx

from es_jax import models, pruning

SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
HF_CONFIGS = {
    "vit": dict(SMALL, intermediate_size=24, image_size=8, patch_size=4),
    "opt": dict(SMALL, vocab_size=40, ffn_dim=24, max_position_embeddings=16),
    "llama": dict(SMALL, vocab_size=40, intermediate_size=24, num_key_value_heads=1),
}
ENCODER_COMPONENTS = ("attention/query", "attention/key", "attention/value", "attention/out")
DECODER_COMPONENTS = tuple(c.replace("attention/", "self_attn/") for c in ENCODER_COMPONENTS)
COMPONENTS = {
    "bert": (*ENCODER_COMPONENTS, "mlp/up", "mlp/down"),
    "vit": (*ENCODER_COMPONENTS, "mlp/up", "mlp/down"),
    "opt": (*DECODER_COMPONENTS, "mlp/up", "mlp/down"),
    "llama": (*DECODER_COMPONENTS, "mlp/gate", "mlp/up", "mlp/down"),
}


@pytest.fixture(params=list(COMPONENTS))
def name(request):
    """The name of each family module in turn."""
    return request.param


@pytest.fixture
def family(name):
    """The family module of that name."""
    return getattr(models, name)


@pytest.fixture
def config(family, name, tiny_bert):
    """A tiny config of the family."""
    return family.config_from_hf(dict(tiny_bert) if name == "bert" else HF_CONFIGS[name])


@pytest.fixture
def built(family, config):
    """{task: model} for None and every task of the family, built abstractly."""
    return {task: _abstract(family, config, task) for task in (None, *family.TASKS)}


def _abstract(family, config, task):
    """The family's model for `task`, built with shapes only."""
    return nnx.eval_shape(lambda: family.build(config, task, rngs=nnx.Rngs(0), num_labels=3))


def _param_paths(model):
    """The '/'-joined paths of a model's parameters."""
    return pruning.leaf_paths(nnx.state(model, nnx.Param))


def test_every_family_module_fulfils_the_protocol(family):
    assert isinstance(family, models.Family)
    assert family in models.FAMILIES


def test_a_module_lacking_members_is_not_a_family():
    assert not isinstance(models.layers, models.Family)


def test_every_prunable_path_has_its_layer_and_component(name, family, built):
    expected = sorted((layer, c) for layer in range(2) for c in COMPONENTS[name])
    for task, model in built.items():
        targets = [p for p in _param_paths(model) if re.fullmatch(family.PRUNABLE, p)]
        found = sorted((family.layer_of(p), family.component_of(p)) for p in targets)
        assert found == expected, task


def test_only_paths_inside_the_blocks_have_a_layer(family, built):
    for model in built.values():
        for path in _param_paths(model):
            in_block = re.search(r"(?:^|/)layers/\d+/", path) is not None
            assert (family.layer_of(path) is not None) == in_block, path
            assert (family.component_of(path) == path) == (not in_block), path


@pytest.mark.parametrize(
    ("name", "path", "layer", "component"),
    [
        ("bert", "encoder/layers/3/attention/query/kernel", 3, "attention/query"),
        ("bert", "bert/encoder/layers/11/mlp/down/bias", 11, "mlp/down"),
        ("bert", "bert/encoder/layers/0/attention_norm/scale", 0, "attention_norm"),
        ("bert", "bert/embeddings/norm/scale", None, "bert/embeddings/norm/scale"),
        ("vit", "vit/encoder/layers/2/mlp/up/kernel", 2, "mlp/up"),
        ("opt", "decoder/layers/5/self_attn/out/kernel", 5, "self_attn/out"),
        ("opt", "decoder/layers/1/final_layer_norm/bias", 1, "final_layer_norm"),
        ("opt", "decoder/project_in/kernel", None, "decoder/project_in/kernel"),
        ("llama", "model/layers/29/mlp/gate/kernel", 29, "mlp/gate"),
        ("llama", "lm_head/kernel", None, "lm_head/kernel"),
        ("llama", "decoder/layers/1/mlp/up/kernel", None, "decoder/layers/1/mlp/up/kernel"),
    ],
)
def test_layer_and_component_of_a_path(name, path, layer, component):
    family = getattr(models, name)
    assert family.layer_of(path) == layer
    assert family.component_of(path) == component


def test_weight_specs_name_every_parameter_once(family, built):
    for task, model in built.items():
        named = ["/".join(map(str, spec.path)) for spec in family.weight_specs(model)]
        assert sorted(named) == sorted(_param_paths(model)), task


def test_family_of_a_model_of_its_paths_and_of_its_model_type(family, built):
    for model in built.values():
        assert models.family_of(model) is family
        assert models.family_of_paths(iter(_param_paths(model))) is family
    assert models.family_for(family.MODEL_TYPES[0]) is family


def test_prunable_paths_alone_find_a_decoder_but_not_bert_or_vit(name, family, built):
    targets = [path for path in _param_paths(built[None]) if re.fullmatch(family.PRUNABLE, path)]
    if name in ("opt", "llama"):
        assert models.family_of_paths(targets) is family
    else:
        with pytest.raises(ValueError, match=r"fit bert and vit alike.*input embedding"):
            models.family_of_paths(targets)


def test_paths_of_no_family_are_refused_naming_the_first_ones():
    with pytest.raises(ValueError, match=r"PRUNABLE matches.*'dense/kernel', 'head/bias'"):
        models.family_of_paths(["dense/kernel", "head/bias", "head/kernel", "other/scale"])


def test_unknown_task_is_refused_naming_the_choices(family, config):
    with pytest.raises(ValueError, match=rf"no task 'translation'.*'{family.TASKS[-1]}'"):
        family.build(config, "translation", rngs=nnx.Rngs(0))
