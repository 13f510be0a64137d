"""Shared layers: parity with transformers' PyTorch building blocks, masks, RoPE."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

from es_jax.models import hf_names, layers

TOL = 1e-5


def _llama_attention_pair(num_heads: int, num_kv_heads: int):
    """A transformers LlamaAttention and our Attention holding the same weights."""
    config = LlamaConfig(
        hidden_size=32,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=64,
        rope_theta=500.0,
        vocab_size=11,
        num_hidden_layers=1,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = modeling_llama.LlamaAttention(config, layer_idx=0).eval()
    ours = layers.Attention(
        32,
        num_heads,
        num_kv_heads=num_kv_heads,
        use_bias=False,
        rope_theta=500.0,
        rngs=nnx.Rngs(0),
    )
    names = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "out"}
    specs = [
        s for hf, ours in names.items() for s in hf_names.linear_specs(hf, (ours,), bias=False)
    ]
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    hf_names.assign_hf_tensors(ours, specs, state, family="test")
    return config, theirs, ours


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_llama_attention_with_rope_gqa_causal_and_padding(
    num_heads, num_kv_heads
):
    config, theirs, ours = _llama_attention_pair(num_heads, num_kv_heads)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, 6)
    keep[1, 4:] = 0  # right padding in the second sequence
    positions = torch.arange(6)[None].expand(2, 6)
    cos, sin = modeling_llama.LlamaRotaryEmbedding(config)(x, positions)
    bias = torch.triu(torch.full((6, 6), float("-inf")), 1)[None, None]
    bias = bias + (1 - keep)[:, None, None, :] * torch.finfo(torch.float32).min
    with torch.no_grad():
        expected, _ = theirs(x, (cos, sin), bias)
    got = ours(jnp.asarray(x.numpy()), attention_mask=jnp.asarray(keep.numpy()), causal=True)
    valid = keep.numpy().astype(bool)
    np.testing.assert_allclose(np.asarray(got)[valid], expected.numpy()[valid], atol=TOL)


def test_padding_mask_hides_padded_keys():
    attention = layers.Attention(16, 2, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 16)), jnp.float32)
    changed = x.at[:, 3:].set(7.0)
    keep = jnp.array([[1, 1, 1, 0, 0]])
    a = attention(x, attention_mask=keep)
    b = attention(changed, attention_mask=keep)
    np.testing.assert_allclose(np.asarray(a[:, :3]), np.asarray(b[:, :3]), atol=1e-6)
    assert not np.allclose(np.asarray(attention(x)[:, :3]), np.asarray(a[:, :3]))


def test_causal_attention_ignores_future_tokens():
    attention = layers.Attention(16, 4, num_kv_heads=2, rope_theta=10000.0, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 16)), jnp.float32)
    changed = x.at[:, 4:].add(3.0)
    a = attention(x, causal=True)
    b = attention(changed, causal=True)
    np.testing.assert_allclose(np.asarray(a[:, :4]), np.asarray(b[:, :4]), atol=1e-6)
    assert not np.allclose(np.asarray(a[:, 4:]), np.asarray(b[:, 4:]))


def test_additive_bias_equals_boolean_mask():
    attention = layers.Attention(16, 2, rngs=nnx.Rngs(2))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 16)), jnp.float32)
    keep = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    additive = jnp.where(keep[:, None, None, :] > 0, 0.0, -1e9)
    np.testing.assert_allclose(
        np.asarray(attention(x, attention_mask=keep)),
        np.asarray(attention(x, bias=additive)),
        atol=1e-6,
    )


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

    def score(m, n):
        cos_m, sin_m = layers.rope_cos_sin(jnp.array([[m]]), 8, 100.0)
        cos_n, sin_n = layers.rope_cos_sin(jnp.array([[n]]), 8, 100.0)
        rotated_q = layers.apply_rope(q, cos_m, sin_m)
        return float(jnp.sum(rotated_q * layers.apply_rope(k, cos_n, sin_n)))

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), abs=1e-6)


def test_attention_rejects_head_counts_that_do_not_divide():
    with pytest.raises(ValueError, match="num_kv_heads"):
        layers.Attention(16, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not divisible"):
        layers.Attention(18, 4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(("name", "approximate"), [("gelu", "none"), ("gelu_new", "tanh")])
def test_mlp_gelu_matches_torch(name, approximate):
    mlp = layers.Mlp(8, 32, activation_name=name, rngs=nnx.Rngs(0))
    x = np.random.default_rng(4).normal(size=(3, 8)).astype(np.float32)
    up, down = mlp.up, mlp.down
    hidden = torch.tensor(x) @ torch.tensor(np.asarray(up.kernel[...])) + torch.tensor(
        np.asarray(up.bias[...])
    )
    hidden = torch.nn.functional.gelu(hidden, approximate=approximate)
    expected = hidden @ torch.tensor(np.asarray(down.kernel[...])) + torch.tensor(
        np.asarray(down.bias[...])
    )
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), expected.numpy(), atol=TOL)


def test_gated_mlp_is_swiglu():
    mlp = layers.Mlp(8, 16, activation_name="silu", gated=True, use_bias=False, rngs=nnx.Rngs(0))
    x = np.random.default_rng(5).normal(size=(2, 8)).astype(np.float32)
    gate = x @ np.asarray(mlp.gate.kernel[...])
    up = x @ np.asarray(mlp.up.kernel[...])
    expected = (gate / (1 + np.exp(-gate)) * up) @ np.asarray(mlp.down.kernel[...])
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), expected, atol=TOL)


def test_norms_match_torch():
    x = np.random.default_rng(6).normal(3.0, 2.0, size=(2, 5, 12)).astype(np.float32)
    norm = layers.layer_norm(12, eps=1e-12, rngs=nnx.Rngs(0))
    expected = torch.nn.functional.layer_norm(torch.tensor(x), (12,), eps=1e-12)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected.numpy(), atol=TOL)
    rms = layers.RMSNorm(12, eps=1e-6, rngs=nnx.Rngs(0))
    torch_rms = modeling_llama.LlamaRMSNorm(12, eps=1e-6)
    with torch.no_grad():
        expected_rms = torch_rms(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(rms(jnp.asarray(x))), expected_rms, atol=TOL)


def test_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match="gelu_new"):
        layers.activation("mish")


def test_text_embeddings_sum_word_position_and_type():
    embeddings = layers.TextEmbeddings(
        10, 4, max_positions=6, type_vocab_size=2, position_offset=2, rngs=nnx.Rngs(0)
    )
    ids = jnp.array([[3, 4, 5]])
    types = jnp.array([[0, 1, 1]])
    words = np.asarray(embeddings.word_embeddings.embedding[...])
    positions = np.asarray(embeddings.position_embeddings.embedding[...])
    kinds = np.asarray(embeddings.token_type_embeddings.embedding[...])
    expected = words[[3, 4, 5]] + positions[[2, 3, 4]] + kinds[[0, 1, 1]]
    got = embeddings(ids, token_type_ids=types)
    np.testing.assert_allclose(np.asarray(got)[0], expected, atol=1e-6)


def test_keep_mask_accepts_key_query_and_head_shapes_and_refuses_others():
    keys = jnp.array([[1, 1, 0]])
    full = layers.attention_keep_mask(keys, causal=True, q_len=3, k_len=3)
    expected = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 0]], bool)
    np.testing.assert_array_equal(full[0, 0], expected)
    per_query = layers.attention_keep_mask(
        jnp.asarray(expected)[None], causal=False, q_len=3, k_len=3
    )
    np.testing.assert_array_equal(per_query, full)
    assert layers.attention_keep_mask(None, causal=False, q_len=3, k_len=3) is None
    with pytest.raises(ValueError, match=r"\(B, Lk\)"):
        layers.attention_keep_mask(jnp.ones((3,)), causal=False, q_len=3, k_len=3)
