"""OPT: parity with transformers' PyTorch OPT on tiny random configs (causal LM, classification)."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from es_jax import pruning
from es_jax.models import opt

PAD = 1
TINY = dict(
    vocab_size=97, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, pad_token_id=PAD, init_std=0.1,
)
CONFIGS = {
    "pre_ln": dict(TINY),  # OPT-125m / 1.3b layout
    "post_ln_projected": dict(TINY, do_layer_norm_before=False, word_embed_proj_dim=16),  # 350m
}
TORCH_CLASSES = {
    "causal_lm": transformers.OPTForCausalLM,
    "classification": transformers.OPTForSequenceClassification,
}
TOLERANCE = 1e-4


def torch_opt(hf_config: dict, task: str, seed: int = 0) -> torch.nn.Module:
    """A random transformers OPT model for `task` in eval mode."""
    torch.manual_seed(seed)
    return TORCH_CLASSES[task](transformers.OPTConfig(**hf_config, num_labels=3)).eval()


def numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A PyTorch state dict as numpy arrays."""
    return {name: value.numpy() for name, value in module.state_dict().items()}


def flax_opt(reference: torch.nn.Module, task: str) -> nnx.Module:
    """Our OPT for `task`, built from the reference's config and filled with its weights."""
    config = opt.config_from_hf(reference.config.to_dict())
    model = opt.build(config, task, rngs=nnx.Rngs(1), num_labels=3)
    opt.load_hf_tensors(model, numpy_state(reference))
    model.eval()
    return model


def padded_batch() -> tuple[np.ndarray, np.ndarray]:
    """Three rows: full, right-padded and left-padded (pad id where the mask is 0)."""
    ids = np.random.default_rng(0).integers(3, TINY["vocab_size"], (3, 10))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, :4] = 0
    return np.where(mask == 1, ids, PAD), mask


def torch_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The reference logits as numpy."""
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def flax_logits(model: nnx.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Our logits as numpy."""
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


@pytest.mark.parametrize("name", CONFIGS)
def test_causal_lm_logits_match_transformers_with_padding(name):
    reference = torch_opt(CONFIGS[name], "causal_lm")
    model = flax_opt(reference, "causal_lm")
    ids, mask = padded_batch()
    ours, expected = flax_logits(model, ids, mask), torch_logits(reference, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], expected[real], rtol=0, atol=TOLERANCE)
    assert np.abs(expected[real]).max() > 0.1  # the comparison is not between near-zero logits


@pytest.mark.parametrize("name", CONFIGS)
def test_classification_reads_last_non_pad_token_like_transformers(name):
    reference = torch_opt(CONFIGS[name], "classification")
    model = flax_opt(reference, "classification")
    ids, mask = padded_batch()
    ours = flax_logits(model, ids, mask)
    assert ours.shape == (3, 3)
    np.testing.assert_allclose(ours, torch_logits(reference, ids, mask), rtol=0, atol=TOLERANCE)


def test_left_padding_shifts_positions_so_real_tokens_are_unchanged():
    model = flax_opt(torch_opt(CONFIGS["pre_ln"], "causal_lm"), "causal_lm")
    ids, _ = padded_batch()
    row = ids[:1, :6]
    left_padded = np.concatenate([np.full((1, 4), PAD), row], axis=1)
    mask = np.concatenate([np.zeros((1, 4), int), np.ones((1, 6), int)], axis=1)
    np.testing.assert_allclose(
        flax_logits(model, left_padded, mask)[:, 4:],
        flax_logits(model, row, np.ones_like(row)),
        rtol=0,
        atol=1e-5,
    )


def test_dropout_is_active_in_train_mode_only():
    model = opt.build(opt.config_from_hf(dict(TINY, dropout=0.5)), None, rngs=nnx.Rngs(0))
    ids, mask = padded_batch()
    model.train()
    noisy = flax_logits(model, ids, mask)
    model.eval()
    clean = flax_logits(model, ids, mask)
    np.testing.assert_array_equal(clean, flax_logits(model, ids, mask))
    assert not np.allclose(noisy, clean)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_prunable_selects_six_matrices_per_layer(name, task):
    model = opt.build(opt.config_from_hf(CONFIGS[name]), task, rngs=nnx.Rngs(0))
    paths = pruning.leaf_paths(nnx.state(model, nnx.Param))
    selected = [path for path in paths if re.fullmatch(opt.PRUNABLE, path)]
    assert len(selected) == 6 * TINY["num_hidden_layers"]
    assert all(path.endswith("/kernel") for path in selected)
    assert not any(re.search("embed|norm|project|score|bias", path) for path in selected)
    if name == "post_ln_projected":
        assert "decoder/project_in/kernel" in paths
        assert "decoder/project_out/kernel" in paths


@pytest.mark.parametrize(
    ("name", "task", "sparsity"),
    [("pre_ln", "causal_lm", 0.5), ("post_ln_projected", "classification", 0.0)],
)
def test_export_loads_in_transformers_with_same_outputs_and_zeros(name, task, sparsity, tmp_path):
    model = flax_opt(torch_opt(CONFIGS[name], task), task)
    if sparsity:
        pruned, _ = pruning.omp(nnx.state(model, nnx.Param), sparsity, where=opt.PRUNABLE)
        nnx.update(model, pruned)
    save_file(opt.export_hf_tensors(model), tmp_path / "model.safetensors")
    hf_config = dict(opt.config_to_hf(model.config), num_labels=3)
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    reloaded = TORCH_CLASSES[task].from_pretrained(tmp_path).eval()

    ids, mask = padded_batch()
    ours, theirs = flax_logits(model, ids, mask), torch_logits(reloaded, ids, mask)
    if task == "causal_lm":
        ours, theirs = ours[mask.astype(bool)], theirs[mask.astype(bool)]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)
    targets = [
        p for n, p in reloaded.named_parameters()
        if re.search(r"layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)\.weight", n)
    ]
    assert len(targets) == 6 * TINY["num_hidden_layers"]
    zeros = sum(int((p == 0).sum()) for p in targets)
    assert zeros == round(sparsity * sum(p.numel() for p in targets))


def test_classification_loads_a_causal_lm_checkpoint_with_a_fresh_head():
    reference = torch_opt(CONFIGS["pre_ln"], "causal_lm")
    model = opt.build(opt.config_from_hf(CONFIGS["pre_ln"]), "classification", rngs=nnx.Rngs(1))
    opt.load_hf_tensors(model, numpy_state(reference))
    np.testing.assert_array_equal(
        np.asarray(model.decoder.embed_tokens.embedding),
        reference.model.decoder.embed_tokens.weight.detach().numpy(),
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_config_round_trips_through_transformers(name, assert_config_round_trips):
    assert_config_round_trips(opt, transformers.OPTConfig, CONFIGS[name])


def test_missing_tensor_is_refused_and_nothing_loaded(assert_refused_untouched):
    reference = torch_opt(CONFIGS["post_ln_projected"], "causal_lm")
    model = opt.build(opt.config_from_hf(CONFIGS["post_ln_projected"]), None, rngs=nnx.Rngs(1))
    tensors = numpy_state(reference)
    del tensors["model.decoder.project_in.weight"]
    assert_refused_untouched(model, tensors, r"model\.decoder\.project_in\.weight")


def test_shape_mismatch_names_key_and_both_shapes(assert_refused_untouched):
    reference = torch_opt(dict(TINY, ffn_dim=40), "causal_lm")
    model = opt.build(opt.config_from_hf(TINY), None, rngs=nnx.Rngs(1))
    expected = r"layers\.0\.fc1\.weight.*\(40, 32\).*\(48, 32\)"
    assert_refused_untouched(model, numpy_state(reference), expected)
