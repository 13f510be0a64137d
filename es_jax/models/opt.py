"""OPT decoders (OPT-125m ... 66b, including OPT-350m) as Flax NNX modules, with the HF name map.

Learned positions offset by 2 and counted over real tokens only (as Hugging Face does for left
padding), pre- or post-LayerNorm blocks (`do_layer_norm_before`), a ReLU MLP, OPT-350m's
`word_embed_proj_dim` with project_in/project_out, a causal-LM head tied to the token embeddings and
a sequence-classification head on the last non-pad token. Parameter paths read like
`decoder/layers/3/self_attn/query/kernel`; `PRUNABLE` selects q, k, v, out, fc1 and fc2 of every
block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from es_jax.models import family, hf_names, layers

MODEL_TYPES = ("opt",)
PRUNABLE = r"(?:.*/)?decoder/layers/\d+/(self_attn/(query|key|value|out)|mlp/(up|down))/kernel"
SIGNATURE = r"(?:.*/)?decoder/embed_tokens/embedding"
TASKS = ("causal_lm", "classification")
POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5

layer_of, component_of = family.block_paths("decoder/layers")


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """OPT hyper-parameters under their Hugging Face `config.json` names."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    num_attention_heads: int = 12
    activation_function: str = "relu"
    init_std: float = 0.02
    enable_bias: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    _remove_final_layer_norm: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings (word_embed_proj_dim, the hidden size by default)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def initializer_range(self) -> float:
        """The init std under the name the shared layer constructors read (`init_std` in HF)."""
        return self.init_std

    @property
    def layer_norm_eps(self) -> float:
        """LayerNorm epsilon: PyTorch's default, which OPT uses."""
        return LAYER_NORM_EPS

    @property
    def has_final_layer_norm(self) -> bool:
        """Whether the decoder ends with a LayerNorm (pre-LN models, as in HF)."""
        return self.do_layer_norm_before and not self._remove_final_layer_norm


_NOT_HF = ("dtype", "param_dtype")


def config_from_hf(hf: dict) -> OPTConfig:
    """An `OPTConfig` from an HF `config.json` dict (word_embed_proj_dim made explicit)."""
    if hf.get("model_type", "opt") not in MODEL_TYPES:
        raise ValueError(f"model_type {hf.get('model_type')!r} is not OPT; expected 'opt'")
    if not hf.get("layer_norm_elementwise_affine", True):
        raise ValueError(
            "OPT layer_norm_elementwise_affine=False is not supported; "
            "only checkpoints with LayerNorm scale and bias load"
        )
    names = {field.name for field in dataclasses.fields(OPTConfig)} - set(_NOT_HF)
    config = OPTConfig(**{name: hf[name] for name in names if name in hf})
    return dataclasses.replace(config, word_embed_proj_dim=config.embed_dim)


def config_to_hf(config: OPTConfig) -> dict:
    """The Hugging Face `config.json` dict of `config` (loads in transformers' OPTConfig)."""
    hf = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_HF}
    hf.update(
        model_type="opt",
        architectures=["OPTForCausalLM"],
        word_embed_proj_dim=config.embed_dim,
        layer_norm_elementwise_affine=True,
    )
    return hf


def opt_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions counted over real tokens (padding at -1), before OPT's offset of 2."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask - 1


class OPTDecoderLayer(nnx.Module):
    """One block: self-attention and a ReLU MLP, each with a residual and a LayerNorm before or
    after it (`do_layer_norm_before`)."""

    def __init__(self, config: OPTConfig, *, rngs: nnx.Rngs):
        self.pre_norm = config.do_layer_norm_before
        self.self_attn_layer_norm = layers.hidden_layer_norm(config, rngs)
        self.self_attn = layers.Attention(
            config.hidden_size,
            config.num_attention_heads,
            use_bias=config.enable_bias,
            dropout_rate=config.attention_dropout,
            **layers.layer_kwargs(config, rngs),
        )
        self.final_layer_norm = layers.hidden_layer_norm(config, rngs)
        self.mlp = layers.Mlp(
            config.hidden_size,
            config.ffn_dim,
            activation_name=config.activation_function,
            use_bias=config.enable_bias,
            **layers.layer_kwargs(config, rngs),
        )
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Applies the block to hidden states (B, L, H)."""
        attn_in = self.self_attn_layer_norm(x) if self.pre_norm else x
        attended = self.self_attn(attn_in, attention_mask=attention_mask, causal=True)
        x = x + self.dropout(attended)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        mlp_in = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.dropout(self.mlp(mlp_in))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTDecoder(nnx.Module):
    """Embeddings, blocks, final LayerNorm and projections: hidden states (B, L, embed_dim)."""

    def __init__(self, config: OPTConfig, *, rngs: nnx.Rngs):
        init = layers.layer_kwargs(config, rngs)
        self.embed_tokens = layers.embed(config.vocab_size, config.embed_dim, **init)
        self.embed_positions = layers.embed(
            config.max_position_embeddings + POSITION_OFFSET, config.hidden_size, **init
        )
        projected = config.embed_dim != config.hidden_size
        self.project_in = (
            layers.linear(config.embed_dim, config.hidden_size, use_bias=False, **init)
            if projected
            else None
        )
        self.project_out = (
            layers.linear(config.hidden_size, config.embed_dim, use_bias=False, **init)
            if projected
            else None
        )
        self.layers = nnx.List(
            [OPTDecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.final_layer_norm = (
            layers.hidden_layer_norm(config, rngs) if config.has_final_layer_norm else None
        )
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def embed(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """The hidden states the first block takes: token (projected in) plus position
        embeddings, after dropout (B, L, hidden)."""
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(opt_positions(attention_mask) + POSITION_OFFSET)
        return self.dropout(x)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Last hidden states; `attention_mask` (B, L) marks real tokens (1) and padding (0)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        x = self.embed(input_ids, attention_mask)
        for layer in self.layers:
            x = layer(x, attention_mask)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class OPTForCausalLM(layers.CausalLM):
    """OPT with its language-model head: next-token logits (B, L, vocab)."""

    backbone_name = "decoder"

    def __init__(self, config: OPTConfig, *, rngs: nnx.Rngs):
        super().__init__(config, OPTDecoder(config, rngs=rngs), rngs=rngs)


def last_token_index(input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
    """Index of each row's last non-pad token (HF's rule; the last position without a pad id)."""
    positions = jnp.arange(input_ids.shape[1])
    if pad_token_id is None:
        return jnp.full(input_ids.shape[:1], input_ids.shape[1] - 1)
    return jnp.argmax(positions * (input_ids != pad_token_id), axis=1)


class OPTForSequenceClassification(nnx.Module):
    """OPT with a linear head on the last non-pad token: logits (B, num_labels)."""

    def __init__(self, config: OPTConfig, num_labels: int = 2, *, rngs: nnx.Rngs):
        self.config = config
        self.num_labels = num_labels
        self.decoder = OPTDecoder(config, rngs=rngs)
        self.score = layers.linear(
            config.embed_dim, num_labels, use_bias=False, **layers.layer_kwargs(config, rngs)
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Class logits (B, num_labels) read at each row's last non-pad token."""
        hidden = self.decoder(input_ids, attention_mask)
        last = last_token_index(input_ids, self.config.pad_token_id)
        return self.score(hidden[jnp.arange(hidden.shape[0]), last])


def build(
    config: OPTConfig, task: str | None, *, rngs: nnx.Rngs, num_labels: int = 2
) -> OPTForCausalLM | OPTForSequenceClassification:
    """The OPT module for `task`: None or "causal_lm", or "classification"."""
    if task in (None, "causal_lm"):
        return OPTForCausalLM(config, rngs=rngs)
    if task == "classification":
        return OPTForSequenceClassification(config, num_labels, rngs=rngs)
    raise family.unknown_task("OPT", task, TASKS)


def weight_specs(model: OPTForCausalLM | OPTForSequenceClassification) -> list[hf_names.WeightSpec]:
    """The HF <-> NNX map of every OPT tensor (`model.` prefix optional on load)."""
    config = model.config
    bias = config.enable_bias
    body = hf_names.embed_specs("decoder.embed_tokens", ("decoder", "embed_tokens"))
    body += hf_names.embed_specs("decoder.embed_positions", ("decoder", "embed_positions"))
    if config.embed_dim != config.hidden_size:
        for projection in ("project_in", "project_out"):
            body += hf_names.linear_specs(
                f"decoder.{projection}", ("decoder", projection), bias=False
            )
    attention = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "out_proj": "out"}
    for i in range(config.num_hidden_layers):
        hf, path = f"decoder.layers.{i}", ("decoder", "layers", i)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            body += hf_names.norm_specs(f"{hf}.{norm}", (*path, norm))
        for hf_proj, proj in attention.items():
            body += hf_names.linear_specs(
                f"{hf}.self_attn.{hf_proj}", (*path, "self_attn", proj), bias=bias
            )
        body += hf_names.linear_specs(f"{hf}.fc1", (*path, "mlp", "up"), bias=bias)
        body += hf_names.linear_specs(f"{hf}.fc2", (*path, "mlp", "down"), bias=bias)
    if config.has_final_layer_norm:
        body += hf_names.norm_specs("decoder.final_layer_norm", ("decoder", "final_layer_norm"))
    specs = hf_names.with_prefix(body, "model.", accept_bare=True)
    if isinstance(model, OPTForSequenceClassification):
        specs += hf_names.linear_specs("score", ("score",), bias=False, optional=True)
    elif not config.tie_word_embeddings:
        specs += hf_names.linear_specs("lm_head", ("lm_head",), bias=False)
    return specs


def load_hf_tensors(
    model: OPTForCausalLM | OPTForSequenceClassification, tensors: dict[str, np.ndarray]
) -> None:
    """Fills `model` from an HF OPT state dict; validates every key and shape before assigning.

    A classification head (`score`) missing from the checkpoint keeps its random initialisation.
    """
    hf_names.assign_hf_tensors(model, weight_specs(model), tensors, family="OPT")


def export_hf_tensors(
    model: OPTForCausalLM | OPTForSequenceClassification,
) -> dict[str, np.ndarray]:
    """The HF OPT state dict of `model` (fp32 numpy, PyTorch `(out, in)` layouts)."""
    return hf_names.collect_hf_tensors(model, weight_specs(model))
