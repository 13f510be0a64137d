"""models.prune_sequential: block-by-block pruning with inputs propagated through the pruned blocks,
checked against a reference that records each block's inputs with a whole forward pass of the
model as pruned so far (the same inputs, reached the other way), and numpy selections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es_jax import models, pruning

BLOCK_KERNELS = ("self_attn/query", "self_attn/key", "self_attn/value", "self_attn/out",
                 "mlp/gate", "mlp/up", "mlp/down")


def tiny(family_name: str, seed: int = 0):
    family = getattr(models, family_name)
    config = family.config_from_hf(models.TINY_HF_CONFIGS[family_name])
    model = family.build(config, None, rngs=nnx.Rngs(seed))
    model.eval()
    return model


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(1, 1000, (2, 12)).astype(np.int32)} for _ in range(2)]


def by_path(tree) -> dict:
    return dict(zip(pruning.leaf_paths(tree), jax.tree.leaves(tree), strict=True))


def numpy_per_output_keep(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Kept flags: each output column loses its round(s * in) lowest scores (ties: lower row)."""
    keep = np.ones(scores.shape, bool)
    k = round(sparsity * scores.shape[0])
    for j in range(scores.shape[1]):
        keep[np.lexsort((np.arange(scores.shape[0]), scores[:, j]))[:k], j] = False
    return keep


def reference(model, batches, method, sparsity, block_size=16):
    """Prunes a copy block by block; each block's statistics from a whole forward pass of the
    copy as pruned so far (models.activation_grams / activation_norms)."""
    copy = nnx.clone(model)
    masks = {}
    for i in range(len(copy.model.layers)):
        where = rf"model/layers/{i}/(self_attn|mlp)/\w+/kernel"
        if method == "sparsegpt":
            stats = models.activation_grams(copy, batches, where=where)
        else:
            stats = models.activation_norms(copy, batches, where=where)
        params = by_path(nnx.state(copy, nnx.Param))
        updates = {}
        for path in stats:
            kernel = params[path]
            if method == "sparsegpt":
                result = pruning.sparsegpt(kernel, stats[path], sparsity=sparsity,
                                           block_size=block_size)
                new, keep = np.asarray(result.kernel), np.asarray(result.mask)
            else:
                scores = np.abs(np.asarray(kernel)) * np.asarray(stats[path])[:, None]
                keep = numpy_per_output_keep(scores, sparsity)
                new = np.where(keep, np.asarray(kernel), 0)
            updates[path], masks[path] = new, keep
        for path, new in updates.items():
            module = copy
            for part in path.split("/")[:-1]:
                module = module[int(part)] if part.isdigit() else getattr(module, part)
            module.kernel[...] = jnp.asarray(new)
    return by_path(nnx.state(copy, nnx.Param)), masks


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_equals_pruning_each_block_on_inputs_through_the_pruned_blocks(llama, batches, method):
    before = [np.array(x) for x in jax.tree.leaves(nnx.state(llama, nnx.Param))]
    pruned, mask = models.prune_sequential(llama, batches, method, sparsity=0.5, block_size=16)
    expected, expected_masks = reference(llama, batches, method, 0.5)
    got, got_masks = by_path(pruned), by_path(mask)
    assert sorted(got_masks) == sorted(expected_masks)
    assert len(got_masks) == 7 * len(llama.model.layers)
    for path, keep in expected_masks.items():
        np.testing.assert_array_equal(np.asarray(got_masks[path]), keep, err_msg=path)
    for path, value in expected.items():
        np.testing.assert_allclose(np.asarray(got[path]), np.asarray(value), rtol=2e-5,
                                   atol=2e-6, err_msg=path)
    # the model itself is unchanged
    for old, new in zip(before, jax.tree.leaves(nnx.state(llama, nnx.Param)), strict=True):
        np.testing.assert_array_equal(old, np.asarray(new))


def test_the_second_block_sees_the_first_blocks_pruning(llama, batches):
    # Pruning block 1 on the dense model's inputs gives another mask: propagation matters.
    _, mask = models.prune_sequential(llama, batches, "wanda", sparsity=0.5)
    norms = models.activation_norms(llama, batches, where=r"model/layers/1/.*kernel")
    params = by_path(nnx.state(llama, nnx.Param))
    differs = [
        path for path in norms
        if not np.array_equal(
            numpy_per_output_keep(np.abs(np.asarray(params[path])) *
                                  np.asarray(norms[path])[:, None], 0.5),
            np.asarray(by_path(mask)[path]))
    ]
    assert differs


def test_magnitude_is_layerwise_omp_and_reads_no_data(llama):
    pruned, mask = models.prune_sequential(llama, [], "magnitude", sparsity=0.3)
    params = nnx.state(llama, nnx.Param)
    expected_pruned, expected_mask = pruning.omp(params, 0.3, where=models.llama.PRUNABLE,
                                                 scope="layerwise")
    for (path, keep), expected in zip(by_path(mask).items(), jax.tree.leaves(expected_mask),
                                      strict=True):
        np.testing.assert_array_equal(np.asarray(keep), np.asarray(expected), err_msg=path)
    for got, expected in zip(jax.tree.leaves(pruned), jax.tree.leaves(expected_pruned),
                             strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert jax.tree.structure(mask, is_leaf=lambda x: x is None) == jax.tree.structure(
        expected_mask, is_leaf=lambda x: x is None)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_n_of_m_keeps_n_of_every_m_inputs(llama, batches, method, n, m):
    pruned, mask = models.prune_sequential(llama, batches, method, n=n, m=m, block_size=16)
    kernels = by_path(pruned)
    for path, keep in by_path(mask).items():
        keep = np.asarray(keep)
        groups = keep.reshape(keep.shape[0] // m, m, keep.shape[1])
        assert np.all(groups.sum(axis=1) == n), path
        assert np.all(np.asarray(kernels[path])[~keep] == 0), path


def test_opt_decoders_prune_too(batches):
    opt = tiny("opt")
    pruned, mask = models.prune_sequential(opt, batches, "sparsegpt", sparsity=0.5,
                                           block_size=16)
    masks = by_path(mask)
    assert len(masks) == 6 * len(opt.decoder.layers)
    for path, keep in masks.items():
        assert path.startswith("decoder/layers/")
        assert abs(1 - np.asarray(keep).mean() - 0.5) < 0.05, path
    graphdef, _, rest = nnx.split(opt, nnx.Param, ...)
    pruned_model = nnx.merge(graphdef, pruned, rest)
    logits = pruned_model(jnp.asarray(batches[0]["input_ids"]))
    assert np.isfinite(np.asarray(logits)).all()


def test_bad_calls_say_what_is_wrong(llama, batches):
    with pytest.raises(ValueError, match="unknown method 'obs'"):
        models.prune_sequential(llama, batches, "obs", sparsity=0.5)
    with pytest.raises(ValueError, match=r"either sparsity .* or n and m"):
        models.prune_sequential(llama, batches, "wanda", sparsity=0.5, n=2, m=4)
    with pytest.raises(ValueError, match="0 < n < m"):
        models.prune_sequential(llama, batches, "wanda", n=4, m=4)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        models.prune_sequential(llama, batches, "wanda", sparsity=1.0)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        models.prune_sequential(llama, [], "sparsegpt", sparsity=0.5)
    with pytest.raises(ValueError, match=r"also selects .*embed_tokens"):
        models.prune_sequential(llama, batches, "wanda", sparsity=0.5,
                                where=r".*(embed_tokens/embedding|query/kernel)")
    with pytest.raises(ValueError, match="causal LM"):
        models.prune_sequential(tiny("bert"), batches, "wanda", sparsity=0.5)
