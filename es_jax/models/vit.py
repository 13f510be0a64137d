"""Vision Transformer (ViT, DINO) in Flax NNX with the Hugging Face checkpoint name map.

Pre-LN blocks as in Hugging Face `ViTModel`. Images come in NHWC (`pixel_values` (B, H, W, C)); the
patch embedding is a reshape into non-overlapping patches plus a `Linear`. DINO checkpoints are
`ViTModel`s and load as the backbone without a head. Parameter paths (what `pruning` sees):
`encoder/layers/{i}/attention/{query,key,value,out}/kernel` and
`encoder/layers/{i}/mlp/{up,down}/kernel`, prefixed with `vit/` inside `ViTForImageClassification`.

With `interpolate_pos_encoding=True` (Hugging Face's name) images of any height and width that are
multiples of `patch_size` are accepted, as DINO's multi-crop training needs: the learned position
embeddings of the config's square patch grid are resized to the image's grid by
`resize_position_embeddings` (the [CLS] position is kept as is).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from es_jax.models import family, hf_names, layers

MODEL_TYPES = ("vit",)

PRUNABLE = (
    r"(?:.*/)?encoder/layers/\d+/(?:attention/(?:query|key|value|out)|mlp/(?:up|down))/kernel"
)

SIGNATURE = r"(?:.*/)?embeddings/patch_embeddings/kernel"

TASKS = ("classification",)

layer_of, component_of = family.block_paths("encoder/layers")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """ViT hyper-parameters, named as in Hugging Face's config.json."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def num_patches(self) -> int:
        """Patches per image."""
        return (self.image_size // self.patch_size) ** 2


def config_from_hf(hf: dict) -> ViTConfig:
    """A `ViTConfig` from a Hugging Face config.json dict (unknown fields ignored)."""
    names = {f.name for f in dataclasses.fields(ViTConfig)} - {"dtype", "param_dtype"}
    config = ViTConfig(**{k: v for k, v in hf.items() if k in names})
    if config.image_size % config.patch_size:
        raise ValueError(
            f"image_size={config.image_size} is not a multiple of patch_size={config.patch_size}."
        )
    return config


def config_to_hf(config: ViTConfig) -> dict:
    """The Hugging Face config.json dict of `config`."""
    hf = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("dtype", "param_dtype")}
    return {"model_type": "vit", **hf}


def patchify(pixel_values: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) images -> (B, patches, patch_size * patch_size * C), patches row-major."""
    batch, height, width, channels = pixel_values.shape
    rows, cols = height // patch_size, width // patch_size
    x = pixel_values.reshape(batch, rows, patch_size, cols, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, rows * cols, patch_size * patch_size * channels)


class ViTEmbeddings(nnx.Module):
    """Patch projection, a learned [CLS] token and learned position embeddings."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        patch_features = config.patch_size**2 * config.num_channels
        self.patch_embeddings = layers.linear(
            patch_features, config.hidden_size, **layers.layer_kwargs(config, rngs)
        )
        init = layers.normal_init(config.initializer_range)
        self.cls_token = nnx.Param(
            init(rngs.params(), (1, 1, config.hidden_size), config.param_dtype)
        )
        self.position_embeddings = nnx.Param(
            init(rngs.params(), (1, config.num_patches + 1, config.hidden_size), config.param_dtype)
        )
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(
        self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False
    ) -> jax.Array:
        """Embeds NHWC images into (B, patches + 1, hidden).

        Without `interpolate_pos_encoding` the images must be (B, image_size, image_size, C); with
        it any (B, H, W, C) whose H and W are multiples of `patch_size`, the position embeddings
        resized to the (H / patch_size, W / patch_size) grid by `resize_position_embeddings`.
        """
        if interpolate_pos_encoding:
            grid = patch_grid(pixel_values.shape, self.config)
        else:
            size, channels = self.config.image_size, self.config.num_channels
            if tuple(pixel_values.shape[1:]) != (size, size, channels):
                raise ValueError(
                    f"pixel_values must be NHWC of shape (B, {size}, {size}, {channels}); got "
                    f"{tuple(pixel_values.shape)}. Resize the images or transpose NCHW to NHWC."
                )
        patches = self.patch_embeddings(patchify(pixel_values, self.config.patch_size))
        cls = jnp.broadcast_to(
            self.cls_token[...].astype(patches.dtype), (patches.shape[0], 1, patches.shape[-1])
        )
        x = jnp.concatenate([cls, patches], axis=1)
        positions = self.position_embeddings[...]
        if interpolate_pos_encoding:
            positions = resize_position_embeddings(positions, grid)
        return self.dropout(x + positions.astype(x.dtype))


def patch_grid(shape: tuple[int, ...], config: ViTConfig) -> tuple[int, int]:
    """(rows, cols) of patches of NHWC images of `shape` whose H and W are positive multiples of
    `config.patch_size` and whose C is `config.num_channels`; a ValueError otherwise."""
    patch, channels = config.patch_size, config.num_channels
    if (
        len(shape) != 4
        or shape[-1] != channels
        or min(shape[1:3]) < patch
        or shape[1] % patch
        or shape[2] % patch
    ):
        raise ValueError(
            f"pixel_values must be NHWC of shape (B, H, W, {channels}) with H and W positive "
            f"multiples of patch_size={patch} (interpolate_pos_encoding=True); got {tuple(shape)}. "
            f"Crop or resize the images to a multiple of {patch}, or transpose NCHW to NHWC."
        )
    return shape[1] // patch, shape[2] // patch


def resize_position_embeddings(position_embeddings: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """(1, 1 + g * g, D) embeddings of [CLS] and a square g x g patch grid -> (1, 1 + r * c, D)
    for an r x c grid `grid`: the [CLS] row unchanged, the patch rows resized as a g x g image.

    The resize is `jax.image.resize(..., "bicubic")` in float32, cast back to the input dtype:
    Keys' cubic kernel with a = -0.5, half-pixel centres, weights of samples outside the grid
    dropped and the rest renormalised, antialiased (the kernel widened by g / r) when shrinking.
    It is not torch's bicubic that Hugging Face and DINO use (a = -0.75, no antialiasing), so
    results at another size differ from theirs; at the config's own grid the embeddings are
    returned unchanged.
    """
    count, features = position_embeddings.shape[1], position_embeddings.shape[2]
    side = math.isqrt(count - 1) if count > 1 else 0
    if position_embeddings.shape[0] != 1 or side == 0 or side * side != count - 1:
        raise ValueError(
            f"position_embeddings must be (1, 1 + g * g, D) for a square g x g patch grid; got "
            f"{tuple(position_embeddings.shape)}. Pass a ViT's embeddings.position_embeddings."
        )
    if tuple(grid) == (side, side):
        return position_embeddings
    cls, patches = position_embeddings[:, :1], position_embeddings[0, 1:]
    image = patches.reshape(side, side, features).astype(jnp.float32)
    resized = jax.image.resize(image, (*grid, features), method="bicubic")
    resized = resized.reshape(1, grid[0] * grid[1], features).astype(position_embeddings.dtype)
    return jnp.concatenate([cls, resized], axis=1)


class ViTLayer(nnx.Module):
    """One pre-LN encoder block: norm, attention, residual; norm, MLP, residual."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        common = layers.layer_kwargs(config, rngs)
        self.attention_norm = layers.hidden_layer_norm(config, rngs)
        self.attention = layers.Attention(
            config.hidden_size,
            config.num_attention_heads,
            use_bias=config.qkv_bias,
            out_bias=True,
            dropout_rate=config.attention_probs_dropout_prob,
            **common,
        )
        self.mlp_norm = layers.hidden_layer_norm(config, rngs)
        self.mlp = layers.Mlp(
            config.hidden_size,
            config.intermediate_size,
            activation_name=config.hidden_act,
            **common,
        )
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to (B, N, hidden)."""
        x = x + self.dropout(self.attention(self.attention_norm(x)))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class ViTEncoder(nnx.Module):
    """The stack of encoder blocks."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [ViTLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies every block in turn."""
        for layer in self.layers:
            x = layer(x)
        return x


class ViTModel(nnx.Module):
    """The ViT backbone; `__call__` returns the final-norm hidden states (B, patches + 1, H)."""

    def __init__(self, config: ViTConfig, *, add_pooling_layer: bool = True, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = ViTEmbeddings(config, rngs=rngs)
        self.encoder = ViTEncoder(config, rngs=rngs)
        self.norm = layers.hidden_layer_norm(config, rngs)
        self.pooler = layers.pooler(config, rngs, enabled=add_pooling_layer)

    def __call__(
        self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False
    ) -> jax.Array:
        """Encodes NHWC images (any multiple of the patch size with `interpolate_pos_encoding`)."""
        embedded = self.embeddings(pixel_values, interpolate_pos_encoding)
        return self.norm(self.encoder(embedded))

    def pool(self, hidden: jax.Array) -> jax.Array:
        """The HF pooled output: tanh(dense(hidden state of [CLS]))."""
        return layers.first_token_pool(self.pooler, hidden)


class ViTForImageClassification(nnx.Module):
    """ViT with a linear classifier on the final [CLS] hidden state."""

    def __init__(self, config: ViTConfig, num_labels: int = 2, *, rngs: nnx.Rngs):
        self.config = config
        self.num_labels = num_labels
        self.vit = ViTModel(config, add_pooling_layer=False, rngs=rngs)
        self.classifier = layers.linear(
            config.hidden_size, num_labels, **layers.layer_kwargs(config, rngs)
        )

    def __call__(
        self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False
    ) -> jax.Array:
        """Class logits (B, num_labels) (images of any multiple of the patch size with
        `interpolate_pos_encoding`)."""
        return self.classifier(self.vit(pixel_values, interpolate_pos_encoding)[:, 0])


def build(
    config: ViTConfig, task: str | None, *, rngs: nnx.Rngs, num_labels: int = 2
) -> nnx.Module:
    """The ViT model for `task`: None (the backbone) or "classification"."""
    if task is None:
        return ViTModel(config, rngs=rngs)
    if task == "classification":
        return ViTForImageClassification(config, num_labels, rngs=rngs)
    raise family.unknown_task("ViT", task, TASKS)


# ----------------------------------------------------------------------------------------------
# Hugging Face names.


def _conv_to_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight (out, C, p, p) -> patch kernel (p * p * C, out)."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(-1, weight.shape[0]))


def _kernel_to_conv(kernel: np.ndarray, patch_size: int, channels: int) -> np.ndarray:
    """Patch kernel (p * p * C, out) -> PyTorch Conv2d weight (out, C, p, p)."""
    conv = kernel.reshape(patch_size, patch_size, channels, kernel.shape[-1])
    return np.ascontiguousarray(conv.transpose(3, 2, 0, 1))


def _backbone_specs(config: ViTConfig, pooler: bool) -> list[hf_names.WeightSpec]:
    """Specs of a `ViTModel`, HF names without the `vit.` prefix."""
    to_hf = functools.partial(
        _kernel_to_conv, patch_size=config.patch_size, channels=config.num_channels
    )
    patch = "embeddings.patch_embeddings.projection"
    specs = [
        hf_names.WeightSpec("embeddings.cls_token", ("embeddings", "cls_token")),
        hf_names.WeightSpec(
            "embeddings.position_embeddings", ("embeddings", "position_embeddings")
        ),
        hf_names.WeightSpec(
            f"{patch}.weight", ("embeddings", "patch_embeddings", "kernel"), _conv_to_kernel, to_hf
        ),
        hf_names.WeightSpec(f"{patch}.bias", ("embeddings", "patch_embeddings", "bias")),
    ]
    for i in range(config.num_hidden_layers):
        # Hub checkpoints use the transformers-4 names; transformers 5 renamed the modules.
        hf, v5, ours = f"encoder.layer.{i}", f"layers.{i}", ("encoder", "layers", i)
        specs += hf_names.norm_specs(
            f"{hf}.layernorm_before",
            (*ours, "attention_norm"),
            alias_prefixes=(f"{v5}.layernorm_before",),
        )
        for name, v5_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            specs += hf_names.linear_specs(
                f"{hf}.attention.attention.{name}",
                (*ours, "attention", name),
                bias=config.qkv_bias,
                alias_prefixes=(f"{v5}.attention.{v5_name}",),
            )
        specs += hf_names.linear_specs(
            f"{hf}.attention.output.dense",
            (*ours, "attention", "out"),
            alias_prefixes=(f"{v5}.attention.o_proj",),
        )
        specs += hf_names.norm_specs(
            f"{hf}.layernorm_after", (*ours, "mlp_norm"), alias_prefixes=(f"{v5}.layernorm_after",)
        )
        specs += hf_names.linear_specs(
            f"{hf}.intermediate.dense", (*ours, "mlp", "up"), alias_prefixes=(f"{v5}.mlp.fc1",)
        )
        specs += hf_names.linear_specs(
            f"{hf}.output.dense", (*ours, "mlp", "down"), alias_prefixes=(f"{v5}.mlp.fc2",)
        )
    specs += hf_names.norm_specs("layernorm", ("norm",))
    if pooler:
        specs += hf_names.linear_specs("pooler.dense", ("pooler",), optional=True)
    return specs


def weight_specs(model: nnx.Module) -> list[hf_names.WeightSpec]:
    """The HF <-> NNX name map of any ViT model of this module."""
    if isinstance(model, ViTModel):
        specs = _backbone_specs(model.config, model.pooler is not None)
        return hf_names.accept_prefixed(specs, "vit.")
    if not isinstance(model, ViTForImageClassification):
        raise TypeError(f"{type(model).__name__} is not a ViT model of es_jax.models.vit")
    specs = hf_names.nested(_backbone_specs(model.config, False), "vit")
    return specs + hf_names.linear_specs("classifier", ("classifier",), optional=True)


def load_hf_tensors(model: nnx.Module, tensors: dict[str, np.ndarray]) -> None:
    """Fills `model` in place from a Hugging Face ViT state dict (validated before assigning)."""
    hf_names.assign_hf_tensors(model, weight_specs(model), tensors, family="ViT")


def export_hf_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The Hugging Face state dict of `model` (loads into the matching transformers class)."""
    return hf_names.collect_hf_tensors(model, weight_specs(model))
