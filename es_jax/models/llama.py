"""Llama decoders (SmolLM2, Vicuna, Llama 2) as Flax NNX modules, with the Hugging Face name map.

Pre-norm blocks of grouped-query attention with RoPE and a SwiGLU MLP, RMSNorm, and a causal-LM
head that is either tied to the token embeddings (SmolLM2) or a separate matrix (Vicuna). Parameter
paths read like `model/layers/3/self_attn/query/kernel`; `PRUNABLE` selects the q, k, v, o and
gate/up/down kernels of every block, as the paper prunes them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from es_jax.models import family, hf_names, layers

MODEL_TYPES = ("llama",)
PRUNABLE = r"(?:.*/)?model/layers/\d+/(self_attn/(query|key|value|out)|mlp/(gate|up|down))/kernel"
SIGNATURE = r"(?:.*/)?model/embed_tokens/embedding"
TASKS = ("causal_lm",)

layer_of, component_of = family.block_paths("model/layers")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama hyper-parameters under their Hugging Face `config.json` names."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def kv_heads(self) -> int:
        """Key/value heads (the number of query heads unless grouped)."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attention_head_dim(self) -> int:
        """Size of one attention head."""
        return self.head_dim or self.hidden_size // self.num_attention_heads


_NOT_HF = ("rope_theta", "dtype", "param_dtype")


def _rope_theta(hf: dict) -> float:
    """RoPE base from an HF config (transformers 5 `rope_parameters` or 4.x `rope_theta`)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"Llama rope scaling {rope_type!r} ({rope}) is not supported; only plain RoPE "
            "(rope_type 'default') checkpoints load"
        )
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict) -> LlamaConfig:
    """A `LlamaConfig` from an HF `config.json` dict (KV heads and head size made explicit)."""
    if hf.get("model_type", "llama") not in MODEL_TYPES:
        raise ValueError(f"model_type {hf.get('model_type')!r} is not a Llama; expected 'llama'")
    names = {field.name for field in dataclasses.fields(LlamaConfig)} - set(_NOT_HF)
    values = {name: hf[name] for name in names if name in hf}
    if isinstance(values.get("eos_token_id"), list):
        values["eos_token_id"] = tuple(values["eos_token_id"])
    config = LlamaConfig(**values, rope_theta=_rope_theta(hf))
    return dataclasses.replace(
        config, num_key_value_heads=config.kv_heads, head_dim=config.attention_head_dim
    )


def config_to_hf(config: LlamaConfig) -> dict:
    """The Hugging Face `config.json` dict of `config` (loads in transformers' LlamaConfig)."""
    hf = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_HF}
    hf.update(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        num_key_value_heads=config.kv_heads,
        head_dim=config.attention_head_dim,
        rope_theta=config.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )
    if isinstance(config.eos_token_id, tuple):
        hf["eos_token_id"] = list(config.eos_token_id)
    return hf


class LlamaDecoderLayer(nnx.Module):
    """One pre-norm block: x + attn(norm(x)), then x + swiglu(norm(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, param_dtype=config.param_dtype, rngs=rngs)
        self.input_layernorm = layers.RMSNorm(config.hidden_size, **norm)
        self.self_attn = layers.Attention(
            config.hidden_size,
            config.num_attention_heads,
            num_kv_heads=config.kv_heads,
            head_dim=config.attention_head_dim,
            use_bias=config.attention_bias,
            rope_theta=config.rope_theta,
            **layers.layer_kwargs(config, rngs),
        )
        self.post_attention_layernorm = layers.RMSNorm(config.hidden_size, **norm)
        self.mlp = layers.Mlp(
            config.hidden_size,
            config.intermediate_size,
            activation_name=config.hidden_act,
            gated=True,
            use_bias=config.mlp_bias,
            **layers.layer_kwargs(config, rngs),
        )

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        """Applies the block to hidden states (B, L, H)."""
        attended = self.self_attn(
            self.input_layernorm(x), attention_mask=attention_mask, causal=True
        )
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):
    """Token embeddings, the decoder blocks and the final RMSNorm: hidden states (B, L, H)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.embed_tokens = layers.embed(
            config.vocab_size, config.hidden_size, **layers.layer_kwargs(config, rngs)
        )
        self.layers = nnx.List(
            [LlamaDecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.norm = layers.RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, param_dtype=config.param_dtype, rngs=rngs
        )

    def embed(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """The hidden states the first block takes: the token embeddings (B, L, H)."""
        del attention_mask  # positions enter through RoPE inside the blocks
        return self.embed_tokens(input_ids)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Final hidden states; `attention_mask` (B, L) marks real tokens (1) and padding (0)."""
        x = self.embed(input_ids, attention_mask)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return self.norm(x)


class LlamaForCausalLM(layers.CausalLM):
    """Llama with its language-model head: next-token logits (B, L, vocab)."""

    backbone_name = "model"

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        super().__init__(config, LlamaModel(config, rngs=rngs), rngs=rngs)


def build(
    config: LlamaConfig, task: str | None, *, rngs: nnx.Rngs, num_labels: int = 2
) -> LlamaForCausalLM:
    """The Llama module for `task` (None or "causal_lm"; Llama has no other head here)."""
    del num_labels  # causal LM only
    if task not in (None, *TASKS):
        raise family.unknown_task("Llama", task, TASKS)
    return LlamaForCausalLM(config, rngs=rngs)


def weight_specs(model: LlamaForCausalLM) -> list[hf_names.WeightSpec]:
    """The HF <-> NNX map of every Llama tensor (`model.` prefix optional on load)."""
    config = model.config
    attention = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "out"}
    mlp = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    body = hf_names.embed_specs("embed_tokens", ("model", "embed_tokens"))
    for i in range(config.num_hidden_layers):
        hf, path = f"layers.{i}", ("model", "layers", i)
        body += hf_names.norm_specs(f"{hf}.input_layernorm", (*path, "input_layernorm"), bias=False)
        body += hf_names.norm_specs(
            f"{hf}.post_attention_layernorm", (*path, "post_attention_layernorm"), bias=False
        )
        for hf_proj, proj in attention.items():
            body += hf_names.linear_specs(
                f"{hf}.self_attn.{hf_proj}", (*path, "self_attn", proj), bias=config.attention_bias
            )
        for hf_proj, proj in mlp.items():
            body += hf_names.linear_specs(
                f"{hf}.mlp.{hf_proj}", (*path, "mlp", proj), bias=config.mlp_bias
            )
    body += hf_names.norm_specs("norm", ("model", "norm"), bias=False)
    specs = hf_names.with_prefix(body, "model.", accept_bare=True)
    if not config.tie_word_embeddings:
        specs += hf_names.linear_specs("lm_head", ("lm_head",), bias=False)
    return specs


def load_hf_tensors(model: LlamaForCausalLM, tensors: dict[str, np.ndarray]) -> None:
    """Fills `model` from an HF Llama state dict; validates every key and shape before assigning."""
    hf_names.assign_hf_tensors(model, weight_specs(model), tensors, family="Llama")


def export_hf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The HF Llama state dict of `model` (fp32 numpy, PyTorch `(out, in)` layouts)."""
    return hf_names.collect_hf_tensors(model, weight_specs(model))
