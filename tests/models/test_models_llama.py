"""Llama: parity with transformers' PyTorch Llama (tiny random configs and the real SmolLM2)."""

import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file
from transformers.initialization import no_init_weights

from es_jax import pruning
from es_jax.models import llama
from es_jax.models.gguf import read_gguf, smollm2_path

TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0,
    initializer_range=0.1,
)
CONFIGS = {
    "gqa_untied": dict(TINY, num_key_value_heads=2, tie_word_embeddings=False),
    "mqa_tied": dict(TINY, num_key_value_heads=1, tie_word_embeddings=True),
    "wide_heads_biases": dict(
        TINY, num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True
    ),
}
TOLERANCE = 1e-4


def torch_llama(hf_config: dict, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A random transformers Llama in eval mode."""
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()


def numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A PyTorch state dict as numpy arrays."""
    return {name: value.numpy() for name, value in module.state_dict().items()}


def flax_llama(reference: transformers.LlamaForCausalLM) -> llama.LlamaForCausalLM:
    """Our Llama built from the reference's config and filled with its weights."""
    model = llama.build(
        llama.config_from_hf(reference.config.to_dict()), None, rngs=nnx.Rngs(1)
    )
    llama.load_hf_tensors(model, numpy_state(reference))
    return model


def padded_batch(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Three rows of ids: full, right-padded and left-padded, with their attention mask."""
    ids = np.random.default_rng(0).integers(0, vocab_size, (3, 10))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, :4] = 0
    return ids, mask


def torch_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The reference logits as numpy."""
    with torch.no_grad():
        attention = None if mask is None else torch.tensor(mask)
        return model(torch.tensor(ids), attention_mask=attention).logits.numpy()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_with_padding(name):
    reference = torch_llama(CONFIGS[name])
    model = flax_llama(reference)
    ids, mask = padded_batch(TINY["vocab_size"])
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    expected = torch_logits(reference, ids, mask)
    real = mask.astype(bool)
    assert ours.shape == expected.shape == (3, 10, TINY["vocab_size"])
    np.testing.assert_allclose(ours[real], expected[real], rtol=0, atol=TOLERANCE)
    assert np.abs(expected[real]).max() > 0.1  # the comparison is not between near-zero logits


def test_no_mask_equals_all_ones_mask():
    model = flax_llama(torch_llama(CONFIGS["gqa_untied"]))
    ids, _ = padded_batch(TINY["vocab_size"])
    ids = jnp.asarray(ids)
    np.testing.assert_array_equal(
        np.asarray(model(ids)), np.asarray(model(ids, attention_mask=jnp.ones_like(ids)))
    )


def test_tied_model_has_no_lm_head_and_uses_embeddings():
    model = flax_llama(torch_llama(CONFIGS["mqa_tied"]))
    assert model.lm_head is None
    paths = pruning.leaf_paths(nnx.state(model, nnx.Param))
    assert not any("lm_head" in path for path in paths)


@pytest.mark.parametrize("name", CONFIGS)
def test_prunable_selects_seven_matrices_per_layer(name):
    model = llama.build(llama.config_from_hf(CONFIGS[name]), None, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    paths = pruning.leaf_paths(params)
    selected = [path for path in paths if re.fullmatch(llama.PRUNABLE, path)]
    assert len(selected) == 7 * TINY["num_hidden_layers"]
    assert all(path.endswith("/kernel") for path in selected)
    assert not any(re.search("embed|norm|lm_head|bias", path) for path in selected)
    report = pruning.report(params, where=llama.PRUNABLE)
    targets = [path for path, leaf in report["leaves"].items() if leaf["target"]]
    assert sorted(targets) == sorted(selected)


@pytest.mark.parametrize(("name", "sparsity"), [("mqa_tied", 0.0), ("wide_heads_biases", 0.5)])
def test_export_loads_in_transformers_with_same_logits_and_zeros(name, sparsity, tmp_path):
    model = flax_llama(torch_llama(CONFIGS[name]))
    if sparsity:
        pruned, _ = pruning.omp(nnx.state(model, nnx.Param), sparsity, where=llama.PRUNABLE)
        nnx.update(model, pruned)
    save_file(llama.export_hf_tensors(model), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(llama.config_to_hf(model.config)))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()

    ids, mask = padded_batch(TINY["vocab_size"])
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(
        ours[real], torch_logits(reloaded, ids, mask)[real], rtol=0, atol=TOLERANCE
    )
    q_proj = reloaded.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    query = model.model.layers[0].self_attn.query.kernel
    np.testing.assert_array_equal(q_proj, np.asarray(query).T)
    target_weights = sum(
        p.numel() for n, p in reloaded.named_parameters() if n.endswith("proj.weight")
    )
    zeros = sum(
        int((p == 0).sum()) for n, p in reloaded.named_parameters() if n.endswith("proj.weight")
    )
    assert zeros == round(sparsity * target_weights)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_round_trips_through_transformers(name, assert_config_round_trips):
    assert_config_round_trips(llama, transformers.LlamaConfig, CONFIGS[name])


def test_missing_tensor_is_refused_and_nothing_loaded(assert_refused_untouched):
    reference = torch_llama(CONFIGS["gqa_untied"])
    model = llama.build(llama.config_from_hf(CONFIGS["gqa_untied"]), None, rngs=nnx.Rngs(1))
    tensors = numpy_state(reference)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    assert_refused_untouched(model, tensors, r"model\.layers\.1\.mlp\.up_proj\.weight")


def test_shape_mismatch_names_key_and_both_shapes(assert_refused_untouched):
    reference = torch_llama(dict(CONFIGS["gqa_untied"], intermediate_size=40))
    model = llama.build(llama.config_from_hf(CONFIGS["gqa_untied"]), None, rngs=nnx.Rngs(1))
    expected = r"layers\.0\.mlp\.gate_proj\.weight.*\(40, 32\).*\(48, 32\)"
    assert_refused_untouched(model, numpy_state(reference), expected)


def test_rope_scaling_is_refused():
    hf = dict(TINY, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="rope scaling 'linear'"):
        llama.config_from_hf(hf)


def test_bfloat16_compute_runs_close_to_float32():
    reference = torch_llama(CONFIGS["gqa_untied"])
    model = flax_llama(reference)
    bf16 = llama.build(
        dataclasses.replace(model.config, dtype=jnp.bfloat16), None, rngs=nnx.Rngs(1)
    )
    llama.load_hf_tensors(bf16, numpy_state(reference))
    ids, _ = padded_batch(TINY["vocab_size"])
    low = bf16(jnp.asarray(ids))
    assert low.dtype == jnp.bfloat16
    high = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(np.asarray(low, np.float32) - high).max() < 0.05 * np.abs(high).max()


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct, dequantised from the bundled GGUF.

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2():
    """Our SmolLM2, its tokenizer, its HF config and tensors, read once for this module."""
    hf_config, tensors, tokenizer = read_gguf(smollm2_path())
    model = llama.build(llama.config_from_hf(hf_config), None, rngs=nnx.Rngs(0))
    llama.load_hf_tensors(model, tensors)
    return model, tokenizer, hf_config, tensors


def test_smollm2_logits_match_transformers_on_same_weights(smollm2):
    model, tokenizer, hf_config, tensors = smollm2
    with no_init_weights():  # every weight is overwritten below
        reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()
    state = {name: torch.from_numpy(value) for name, value in tensors.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied
    reference.load_state_dict(state, strict=True)
    ids = np.asarray([tokenizer.encode(PROMPT)])
    ours = np.asarray(model(jnp.asarray(ids)))
    expected = torch_logits(reference, ids, None)
    np.testing.assert_allclose(ours[0, -1], expected[0, -1], rtol=0, atol=1e-3)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-3)


def test_smollm2_greedy_completion_names_paris(smollm2):
    model, tokenizer, _, _ = smollm2
    ids = tokenizer.encode(PROMPT)
    for _ in range(2):
        logits = model(jnp.asarray([ids]))
        ids.append(int(jnp.argmax(logits[0, -1])))
    assert tokenizer.decode(ids).startswith(PROMPT + " Paris")


def test_smollm2_prunable_covers_every_block(smollm2):
    model, _, hf_config, _ = smollm2
    paths = pruning.leaf_paths(nnx.state(model, nnx.Param))
    selected = [path for path in paths if re.fullmatch(llama.PRUNABLE, path)]
    assert len(selected) == 7 * hf_config["num_hidden_layers"] == 210

