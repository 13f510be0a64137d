"""Layers shared by the model families: attention, MLPs, embeddings, norms and the causal-LM head.

Every weight matrix is a plain 2-D `(in, out)` kernel of `Linear` (an `nnx.Linear` that can record
the squared L2 norms of its inputs for activation-aware pruning). Softmax and norm statistics are
computed in float32 whatever the compute `dtype`, so fp32 results match PyTorch to about 1e-5.
Hugging Face checkpoint names live in `hf_names`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
Dtype = Any

INPUT_SQUARES = "input_squares"
INPUT_GRAM = "input_gram"


def normal_init(stddev: float = 0.02) -> nnx.Initializer:
    """The truncation-free normal initialiser Hugging Face models use (`initializer_range`)."""
    return nnx.initializers.normal(stddev)


# ----------------------------------------------------------------------------------------------
# Linear layers that can record their inputs.


class InputSquares(nnx.Intermediate):
    """Per-feature sum of squares of a `Linear`'s inputs over all tokens (via `nnx.capture`)."""


class InputGram(nnx.Intermediate):
    """Sum over all tokens of x x^T of a `Linear`'s inputs x, (in, in) (via `nnx.capture`)."""


class Linear(nnx.Linear):
    """`nnx.Linear` with an `(in, out)` kernel that, when viewed with `record_inputs=True`, sows
    the per-feature sum of squares of its inputs (for Wanda's ||X||), and with `record_gram=True`
    the sum of x x^T over its input tokens (SparseGPT's Hessian)."""

    record_inputs: bool = False
    record_gram: bool = False

    def set_view(self, record_inputs: bool | None = None, record_gram: bool | None = None) -> None:
        """Switches input recording on or off (used through `nnx.view`)."""
        if record_inputs is not None:
            self.record_inputs = record_inputs
        if record_gram is not None:
            self.record_gram = record_gram

    def __call__(self, inputs: Array) -> Array:
        """Applies `inputs @ kernel + bias`, recording the input statistics if asked to."""
        flat = inputs.reshape(-1, inputs.shape[-1]).astype(jnp.float32)
        if self.record_inputs:
            self.sow(InputSquares, INPUT_SQUARES, jnp.sum(jnp.square(flat), axis=0),
                     init_fn=lambda: 0.0, reduce_fn=jnp.add)
        if self.record_gram:
            gram = jnp.matmul(flat.T, flat, precision=jax.lax.Precision.HIGHEST)
            self.sow(InputGram, INPUT_GRAM, gram, init_fn=lambda: 0.0, reduce_fn=jnp.add)
        return super().__call__(inputs)


def linear(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    init_stddev: float = 0.02,
    rngs: nnx.Rngs,
) -> Linear:
    """A `Linear` with Hugging Face's normal(initializer_range) kernel init and zero bias."""
    return Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=normal_init(init_stddev),
        rngs=rngs,
    )


def layer_kwargs(config: Any, rngs: nnx.Rngs) -> dict[str, Any]:
    """What every layer constructor takes from a family config: dtypes and `initializer_range`."""
    return dict(
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        init_stddev=config.initializer_range,
        rngs=rngs,
    )


# ----------------------------------------------------------------------------------------------
# Activations, norms, embeddings.


def gelu_exact(x: Array) -> Array:
    """GELU with the exact erf form (HF "gelu")."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: Array) -> Array:
    """GELU with the tanh approximation (HF "gelu_new", "gelu_pytorch_tanh")."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu_exact,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function for a Hugging Face `hidden_act` name."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"Unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}. "
            "Set hidden_act/activation_function in the config to one of these."
        )
    return ACTIVATIONS[name]


def layer_norm(
    features: int,
    *,
    eps: float,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.LayerNorm:
    """LayerNorm with scale and bias, statistics computed the two-pass (PyTorch) way."""
    return nnx.LayerNorm(
        features,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        rngs=rngs,
    )


def hidden_layer_norm(config: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """A LayerNorm over a family config's `hidden_size` with its `layer_norm_eps`."""
    return layer_norm(
        config.hidden_size,
        eps=config.layer_norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """RMSNorm as in Hugging Face Llama: normalise in float32, cast back, then scale."""

    def __init__(
        self, features: int, *, eps: float, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
    ):
        del rngs  # the scale starts at one; the argument keeps the layer constructors uniform
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x: Array) -> Array:
        """Normalises the last axis of `x`."""
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * normed


def embed(
    num_embeddings: int,
    features: int,
    *,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    init_stddev: float = 0.02,
    rngs: nnx.Rngs,
) -> nnx.Embed:
    """An embedding table with Hugging Face's normal(initializer_range) init."""
    return nnx.Embed(
        num_embeddings,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=normal_init(init_stddev),
        rngs=rngs,
    )


class TextEmbeddings(nnx.Module):
    """Token embeddings plus optional learned position and token-type embeddings (summed)."""

    def __init__(
        self,
        vocab_size: int,
        features: int,
        *,
        max_positions: int = 0,
        type_vocab_size: int = 0,
        position_offset: int = 0,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        init_stddev: float = 0.02,
        rngs: nnx.Rngs,
    ):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, init_stddev=init_stddev, rngs=rngs)
        self.position_offset = position_offset
        self.word_embeddings = embed(vocab_size, features, **kwargs)
        self.position_embeddings = (
            embed(max_positions + position_offset, features, **kwargs) if max_positions else None
        )
        self.token_type_embeddings = (
            embed(type_vocab_size, features, **kwargs) if type_vocab_size else None
        )

    def __call__(
        self,
        input_ids: Array,
        *,
        positions: Array | None = None,
        token_type_ids: Array | None = None,
    ) -> Array:
        """Sums the embeddings; positions default to 0..L-1, token types to 0."""
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if positions is None:
                positions = jnp.arange(input_ids.shape[-1])[None, :]
            x = x + self.position_embeddings(positions + self.position_offset)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        return x


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (Hugging Face Llama convention: rotate_half on split halves).


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos and sin tables of shape `positions.shape + (head_dim,)` in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: Array) -> Array:
    """Maps the halves (x1, x2) of the last axis to (-x2, x1)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates `x` of shape (B, L, heads, D) by position; cos/sin are (B, L, D)."""
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention.


def attention_keep_mask(
    attention_mask: Array | None, *, causal: bool, q_len: int, k_len: int
) -> Array | None:
    """A boolean (B|1, 1, Lq, Lk) mask of the scores to keep, or None when everything is kept.

    `attention_mask` marks the keys to attend (nonzero = attend): shape (B, Lk), (B, Lq, Lk) or
    (B, 1|heads, Lq, Lk). `causal` additionally hides future keys (keys aligned to the end).
    """
    keep = None
    if attention_mask is not None:
        keep = attention_mask.astype(bool)
        if keep.ndim == 2:
            keep = keep[:, None, None, :]
        elif keep.ndim == 3:
            keep = keep[:, None, :, :]
        elif keep.ndim != 4:
            raise ValueError(
                f"attention_mask must have shape (B, Lk), (B, Lq, Lk) or (B, H, Lq, Lk); "
                f"got {attention_mask.shape}"
            )
    if causal:
        future = jnp.arange(k_len)[None, :] > jnp.arange(q_len)[:, None] + (k_len - q_len)
        causal_keep = ~future[None, None]
        keep = causal_keep if keep is None else keep & causal_keep
    return keep


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v/out projections, grouped KV heads and RoPE.

    Parameters live in `query`, `key`, `value` and `out` (`Linear`, `(in, out)` kernels).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        use_bias: bool = True,
        out_bias: bool | None = None,
        rope_theta: float | None = None,
        dropout_rate: float = 0.0,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        init_stddev: float = 0.02,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_kv_heads or num_heads
        if head_dim is None and hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
                "give head_dim explicitly or fix the config."
            )
        head_dim = head_dim or hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}; "
                "fix the attention head counts in the config."
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.dtype = dtype
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, init_stddev=init_stddev, rngs=rngs)
        self.query = linear(hidden_size, num_heads * head_dim, use_bias=use_bias, **kwargs)
        self.key = linear(hidden_size, num_kv_heads * head_dim, use_bias=use_bias, **kwargs)
        self.value = linear(hidden_size, num_kv_heads * head_dim, use_bias=use_bias, **kwargs)
        out_bias = use_bias if out_bias is None else out_bias
        self.out = linear(num_heads * head_dim, hidden_size, use_bias=out_bias, **kwargs)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(
        self,
        x: Array,
        *,
        attention_mask: Array | None = None,
        causal: bool = False,
        positions: Array | None = None,
        bias: Array | None = None,
    ) -> Array:
        """Attends `x` (B, L, hidden) to itself.

        attention_mask: keys to attend (nonzero = attend), see `attention_keep_mask`.
        causal: hide future positions. positions: (B, L) token positions for RoPE (default 0..L-1).
        bias: optional additive score bias broadcastable to (B, heads, L, L).
        """
        batch, length, _ = x.shape
        groups = self.num_heads // self.num_kv_heads
        q = self.query(x).reshape(batch, length, self.num_heads, self.head_dim)
        k = self.key(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = self.value(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        if self.rope_theta is not None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
            cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        q = q.reshape(batch, length, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(batch, self.num_heads, length, length)
        scores = scores * (1.0 / np.sqrt(self.head_dim))
        if bias is not None:
            scores = scores + bias.astype(jnp.float32)
        keep = attention_keep_mask(attention_mask, causal=causal, q_len=length, k_len=length)
        if keep is not None:
            scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = self.dropout(probs).astype(v.dtype)
        probs = probs.reshape(batch, self.num_kv_heads, groups, length, length)
        context = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
        context = context.reshape(batch, length, self.num_heads * self.head_dim)
        return self.out(context)


# ----------------------------------------------------------------------------------------------
# Feed-forward blocks.


class Mlp(nnx.Module):
    """Feed-forward block: `down(act(up(x)))` (BERT, ViT: GELU; OPT: ReLU), or with `gated` the
    SwiGLU form `down(act(gate(x)) * up(x))` (Llama)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation_name: str = "gelu",
        gated: bool = False,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        init_stddev: float = 0.02,
        rngs: nnx.Rngs,
    ):
        kwargs = dict(
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            init_stddev=init_stddev,
            rngs=rngs,
        )
        self.activation = activation(activation_name)
        self.gate = linear(hidden_size, intermediate_size, **kwargs) if gated else None
        self.up = linear(hidden_size, intermediate_size, **kwargs)
        self.down = linear(intermediate_size, hidden_size, **kwargs)

    def __call__(self, x: Array) -> Array:
        """Applies the block to the last axis of `x`."""
        if self.gate is None:
            return self.down(self.activation(self.up(x)))
        return self.down(self.activation(self.gate(x)) * self.up(x))


# ----------------------------------------------------------------------------------------------
# Heads: the encoders' pooler and the causal-LM head.


def pooler(config: Any, rngs: nnx.Rngs, *, enabled: bool) -> Linear | None:
    """Hugging Face's optional encoder pooler, a dense layer over the hidden size (None if off)."""
    if not enabled:
        return None
    return linear(config.hidden_size, config.hidden_size, **layer_kwargs(config, rngs))


def first_token_pool(pooler: Linear | None, hidden: Array) -> Array:
    """The pooled output: tanh(pooler(hidden state of the first token)), (B, L, H) -> (B, H)."""
    if pooler is None:
        raise ValueError(
            "This model was built without a pooler (add_pooling_layer=False); build it with one."
        )
    return jnp.tanh(pooler(hidden[:, 0]))


class CausalLM(nnx.Module):
    """A decoder and its language-model head: the token embeddings (tied) or a separate matrix.

    The decoder maps `(input_ids, attention_mask)` to hidden states and holds the token table as
    `embed_tokens`, the first block's inputs as `embed(input_ids, attention_mask)` and its blocks
    as `layers`, each `(hidden, attention_mask) -> hidden` (what `models.prune_sequential` walks
    block by block); it is stored under the subclass's `backbone_name`, the attribute its checkpoint
    names it by (Llama "model", OPT "decoder"), so parameter paths mirror Hugging Face's.
    """

    backbone_name: str

    def __init__(self, config: Any, backbone: nnx.Module, *, rngs: nnx.Rngs):
        self.config = config
        setattr(self, self.backbone_name, backbone)
        table = backbone.embed_tokens
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else linear(
                table.features, table.num_embeddings, use_bias=False, **layer_kwargs(config, rngs)
            )
        )

    @property
    def backbone(self) -> nnx.Module:
        """The decoder under its checkpoint's attribute name."""
        return getattr(self, self.backbone_name)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Logits (B, L, vocab) for every position; `attention_mask` (B, L) is 0 on padding."""
        hidden = self.backbone(input_ids, attention_mask)
        if self.lm_head is None:
            return self.backbone.embed_tokens.attend(hidden)
        return self.lm_head(hidden)
