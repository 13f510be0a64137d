"""ViT: parity with transformers' PyTorch ViT on a tiny random config, DINO-style backbones,
transformers-4 and -5 names, export back to PyTorch, PRUNABLE, bad input."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from es_jax import models, pruning
from es_jax.models import vit

TOL = 1e-4
TINY = {
    **{k: v for k, v in models.TINY_HF_CONFIGS["vit"].items() if k != "model_type"},
    "num_attention_heads": 4,
    "image_size": 16,
    "patch_size": 4,
    "num_channels": 3,
}


@nnx.jit
def forward(model, pixel_values):
    """One jitted forward pass of any ViT model."""
    return model(pixel_values)


@pytest.fixture(scope="module")
def images():
    """Two random images, NCHW for PyTorch."""
    return np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)


def _nhwc(images):
    """NCHW numpy images as an NHWC jax array."""
    return jnp.asarray(images.transpose(0, 2, 3, 1))


def _torch_model(torch_class, **kwargs):
    """A randomly initialised transformers ViT model."""
    torch.manual_seed(0)
    return torch_class(transformers.ViTConfig(**TINY, **kwargs)).eval()


def _state(theirs, rename=None):
    """The state dict of a transformers model as numpy, names optionally rewritten."""
    rename = rename or (lambda name: name)
    return {rename(k): v.detach().numpy() for k, v in theirs.state_dict().items()}


def _v4_name(name):
    """transformers-5 ViT names back to the transformers-4 names hub checkpoints use."""
    name = re.sub(r"layers\.(\d+)\.", r"encoder.layer.\1.", name)
    for new, old in (
        ("attention.q_proj", "attention.attention.query"),
        ("attention.k_proj", "attention.attention.key"),
        ("attention.v_proj", "attention.attention.value"),
        ("attention.o_proj", "attention.output.dense"),
        ("mlp.fc1", "intermediate.dense"),
        ("mlp.fc2", "output.dense"),
    ):
        name = name.replace(new, old)
    return name


def test_tiny_vit_backbone_matches_pytorch(images):
    theirs = _torch_model(transformers.ViTModel)
    ours = models.from_hf(theirs.config.to_dict(), _state(theirs))
    with torch.no_grad():
        expected = theirs(pixel_values=torch.tensor(images))
    hidden = forward(ours, _nhwc(images))
    np.testing.assert_allclose(hidden, expected.last_hidden_state.numpy(), atol=TOL)
    np.testing.assert_allclose(ours.pool(hidden), expected.pooler_output.numpy(), atol=TOL)


def test_tiny_vit_classifier_matches_pytorch_from_hub_names(images):
    theirs = _torch_model(transformers.ViTForImageClassification, num_labels=5)
    ours = models.from_hf(theirs.config.to_dict(), _state(theirs, _v4_name), task="classification")
    assert ours.num_labels == 5
    with torch.no_grad():
        expected = theirs(pixel_values=torch.tensor(images)).logits.numpy()
    np.testing.assert_allclose(forward(ours, _nhwc(images)), expected, atol=TOL)


def test_dino_style_backbone_without_pooler_or_head_loads(images):
    torch.manual_seed(0)
    theirs = transformers.ViTModel(transformers.ViTConfig(**TINY), add_pooling_layer=False).eval()
    state = _state(theirs, _v4_name)
    assert not any("pooler" in name or "classifier" in name for name in state)
    ours = models.from_hf(theirs.config.to_dict(), state)
    assert isinstance(ours, vit.ViTModel)
    with torch.no_grad():
        expected = theirs(pixel_values=torch.tensor(images)).last_hidden_state.numpy()
    np.testing.assert_allclose(forward(ours, _nhwc(images)), expected, atol=TOL)


def test_pruned_vit_export_loads_in_pytorch(images, tmp_path):
    theirs = _torch_model(transformers.ViTForImageClassification, num_labels=3)
    ours = models.from_hf(theirs.config.to_dict(), _state(theirs), task="classification")
    pruned, _ = pruning.omp(nnx.state(ours, nnx.Param), 0.5, where=vit.PRUNABLE)
    nnx.update(ours, pruned)
    folder = models.export(ours, tmp_path / "vit")
    reloaded = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = reloaded(pixel_values=torch.tensor(images)).logits.numpy()
    np.testing.assert_allclose(forward(ours, _nhwc(images)), expected, atol=TOL)
    fc1 = reloaded.state_dict()["vit.layers.1.mlp.fc1.weight"].numpy()
    up = np.asarray(ours.vit.encoder.layers[1].mlp.up.kernel[...])
    np.testing.assert_array_equal(fc1 == 0, up.T == 0)
    assert (fc1 == 0).any()


def test_patch_kernel_layout_round_trips():
    conv = np.random.default_rng(1).normal(size=(8, 3, 4, 4)).astype(np.float32)
    kernel = vit._conv_to_kernel(conv)
    assert kernel.shape == (48, 8)
    np.testing.assert_array_equal(vit._kernel_to_conv(kernel, 4, 3), conv)


@pytest.mark.parametrize("task", [None, "classification"])
def test_prunable_selects_exactly_six_kernels_per_layer(task):
    model = vit.build(vit.ViTConfig(**TINY), task, rngs=nnx.Rngs(0))
    pattern = re.compile(vit.PRUNABLE)
    paths = pruning.leaf_paths(nnx.state(model, nnx.Param))
    selected = [p for p in paths if pattern.fullmatch(p)]
    assert len(selected) == 6 * TINY["num_hidden_layers"]
    assert not any(re.search(r"embed|norm|pooler|classifier|bias", p) for p in selected)


def test_wrong_image_shape_says_nhwc():
    model = vit.ViTModel(vit.ViTConfig(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 16, 16)))


def test_config_round_trips_and_checks_patch_size():
    config = vit.ViTConfig(**TINY, qkv_bias=False)
    assert vit.config_from_hf(vit.config_to_hf(config)) == config
    with pytest.raises(ValueError, match="patch_size"):
        vit.config_from_hf({**TINY, "image_size": 18})


def _keys_cubic_weights(size_in, size_out):
    """(size_in, size_out) weights of a 1-D resize as jax documents its "bicubic": Keys' kernel
    (a = -0.5) at half-pixel centres, widened by size_in / size_out when shrinking, normalised."""
    scale = size_out / size_in
    centres = (np.arange(size_out) + 0.5) / scale - 0.5
    x = np.abs(centres[None, :] - np.arange(size_in)[:, None]) / max(1.0 / scale, 1.0)
    near = ((1.5 * x - 2.5) * x) * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    weights = np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))
    return weights / weights.sum(axis=0, keepdims=True)


def _tiny_embeddings():
    """The embeddings of a tiny ViT (4 x 4 patch grid, hidden 32) with random parameters."""
    return vit.ViTModel(vit.ViTConfig(**TINY), rngs=nnx.Rngs(0)).embeddings


def test_interpolation_at_the_config_size_is_the_plain_call(images):
    model = vit.ViTForImageClassification(vit.ViTConfig(**TINY), 3, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(
        model(_nhwc(images), interpolate_pos_encoding=True), model(_nhwc(images))
    )


def test_interpolation_to_a_smaller_rectangular_grid_keeps_the_cls_position(images):
    embeddings = _tiny_embeddings()
    crop = _nhwc(images)[:, :8, :12]
    out = embeddings(crop, interpolate_pos_encoding=True)
    assert out.shape == (2, 1 + 2 * 3, TINY["hidden_size"])
    cls = embeddings.cls_token[...][0, 0] + embeddings.position_embeddings[...][0, 0]
    np.testing.assert_allclose(out[:, 0], np.broadcast_to(cls, out[:, 0].shape), atol=1e-7)
    backbone = vit.ViTModel(vit.ViTConfig(**TINY), rngs=nnx.Rngs(0))
    assert backbone(crop, interpolate_pos_encoding=True).shape == (2, 7, TINY["hidden_size"])


@pytest.mark.parametrize("grid", [(2, 2), (3, 6), (8, 5)])
def test_resized_position_embeddings_match_a_numpy_bicubic(grid):
    table = np.random.default_rng(2).normal(size=(1, 17, 5)).astype(np.float32)
    resized = np.asarray(vit.resize_position_embeddings(jnp.asarray(table), grid))
    patches = table[0, 1:].reshape(4, 4, 5).astype(np.float64)
    rows, cols = _keys_cubic_weights(4, grid[0]), _keys_cubic_weights(4, grid[1])
    expected = np.einsum("ar,bc,abd->rcd", rows, cols, patches).reshape(-1, 5)
    assert resized.shape == (1, 1 + grid[0] * grid[1], 5)
    np.testing.assert_array_equal(resized[0, 0], table[0, 0])
    np.testing.assert_allclose(resized[0, 1:], expected, atol=1e-5)


def test_resizing_keeps_a_constant_grid_and_upsamples_by_hand_computed_weights():
    constant = jnp.concatenate([jnp.zeros((1, 1, 2)), jnp.full((1, 16, 2), 0.7)], axis=1)
    np.testing.assert_allclose(vit.resize_position_embeddings(constant, (6, 3))[0, 1:], 0.7,
                               rtol=1e-6)
    # A 2 x 2 grid [[0, 1], [0, 1]] widened to 4 columns samples at x = -0.25, 0.25, 0.75, 1.25.
    # Keys' kernel: k(0.25) = 0.8671875, k(0.75) = 0.2265625, k(1.25) = -0.0703125; weights of
    # samples outside the grid are dropped and the two left renormalised.
    table = jnp.asarray([[[9.0], [0.0], [1.0], [0.0], [1.0]]])
    resized = np.asarray(vit.resize_position_embeddings(table, (2, 4)))
    edge = -0.0703125 / (0.8671875 - 0.0703125)
    inner = 0.2265625 / (0.8671875 + 0.2265625)
    np.testing.assert_allclose(
        resized[0, 1:, 0].reshape(2, 4), [[edge, inner, 1 - inner, 1 - edge]] * 2, atol=1e-6
    )
    assert resized[0, 0, 0] == 9.0


@pytest.mark.parametrize("shape", [(1, 18, 16, 3), (1, 16, 2, 3), (1, 3, 16, 16), (16, 16, 3)])
def test_interpolation_refuses_sizes_that_are_not_patch_multiples(shape):
    with pytest.raises(ValueError, match=r"multiples of patch_size=4"):
        _tiny_embeddings()(jnp.zeros(shape), interpolate_pos_encoding=True)


def test_resize_refuses_a_table_that_is_not_a_square_grid():
    with pytest.raises(ValueError, match="square"):
        vit.resize_position_embeddings(jnp.zeros((1, 16, 4)), (2, 2))
