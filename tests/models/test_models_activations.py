"""models.activation_norms and activation_grams: input-feature L2 norms and input Gram matrices of
every PRUNABLE kernel, checked against the inputs PyTorch's BERT feeds the same layers (captured
with forward hooks, reduced in numpy)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from es_jax import models, pruning
from es_jax.models import bert


@pytest.fixture(scope="module")
def tiny(tiny_bert):
    """A random tiny transformers BertModel, ours with the same weights, and two batches."""
    torch.manual_seed(0)
    theirs = transformers.BertModel(transformers.BertConfig(**tiny_bert)).eval()
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    ours = models.from_hf(theirs.config.to_dict(), state)
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, tiny_bert["vocab_size"], size=(2, 8)) for _ in range(2)]
    batches = [{"input_ids": batch, "attention_mask": np.ones((2, 8), int)} for batch in ids]
    return theirs, ours, batches


def _numpy_norms(theirs, batches, hf_modules):
    """{our kernel path: sqrt(sum over tokens of x^2)} from the inputs PyTorch's layers receive."""
    grams = _numpy_grams(theirs, batches, hf_modules)
    return {path: np.sqrt(np.diag(gram)) for path, gram in grams.items()}


def _numpy_grams(theirs, batches, hf_modules):
    """{our kernel path: sum over tokens of x x^T} from the inputs PyTorch's layers receive."""
    sums = {}

    def hook(path):
        def record(module, inputs, output):
            x = inputs[0].detach().numpy().astype(np.float64)
            x = x.reshape(-1, x.shape[-1])
            sums[path] = sums.get(path, 0.0) + x.T @ x

        return record

    handles = []
    for i in range(theirs.config.num_hidden_layers):
        for ours, hf in hf_modules.items():
            module = theirs.get_submodule(f"encoder.layer.{i}.{hf}")
            handles.append(module.register_forward_hook(hook(f"encoder/layers/{i}/{ours}/kernel")))
    with torch.no_grad():
        for batch in batches:
            theirs(**{k: torch.tensor(v) for k, v in batch.items()})
    for handle in handles:
        handle.remove()
    return sums


def test_norms_match_a_numpy_computation_on_pytorch_inputs(tiny, bert_hf_modules):
    theirs, ours, batches = tiny
    got = models.activation_norms(ours, batches)
    expected = _numpy_norms(theirs, batches, bert_hf_modules)
    assert sorted(got) == sorted(expected)
    assert len(got) == 6 * theirs.config.num_hidden_layers
    for path, norms in got.items():
        np.testing.assert_allclose(np.asarray(norms), expected[path], rtol=1e-4, err_msg=path)


def test_grams_match_a_numpy_computation_on_pytorch_inputs(tiny, bert_hf_modules):
    theirs, ours, batches = tiny
    got = models.activation_grams(ours, batches)
    expected = _numpy_grams(theirs, batches, bert_hf_modules)
    assert sorted(got) == sorted(expected)
    for path, gram in got.items():
        assert gram.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(gram), expected[path], rtol=1e-4, atol=1e-4,
                                   err_msg=path)
    down = "encoder/layers/1/mlp/down/kernel"
    assert got[down].shape == (ours.config.intermediate_size,) * 2


def test_keys_are_the_prunable_parameter_paths_and_feed_wanda(tiny):
    _, ours, batches = tiny
    norms = models.activation_norms(ours, batches[:1])
    scores = pruning.wanda(nnx.state(ours, nnx.Param), norms, where=bert.PRUNABLE)
    query = "encoder/layers/0/attention/query/kernel"
    score_by_path = dict(zip(pruning.leaf_paths(scores), jax.tree.leaves(scores), strict=True))
    kernel = np.asarray(ours.encoder.layers[0].attention.query.kernel[...])
    np.testing.assert_allclose(
        score_by_path[query], np.abs(kernel) * np.asarray(norms[query])[:, None], rtol=1e-6
    )
    assert norms[query].shape == (ours.config.hidden_size,)


def test_custom_selector_and_model_left_unchanged(tiny):
    _, ours, batches = tiny
    norms = models.activation_norms(ours, batches, where=r".*/mlp/down/kernel")
    assert sorted(norms) == [f"encoder/layers/{i}/mlp/down/kernel" for i in range(2)]
    assert norms["encoder/layers/0/mlp/down/kernel"].shape == (ours.config.intermediate_size,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(jnp.asarray(batches[0]["input_ids"]))


def test_bad_selectors_and_no_batches_are_refused(tiny):
    _, ours, batches = tiny
    with pytest.raises(ValueError, match="matches no parameter"):
        models.activation_norms(ours, batches, where=r"nothing/kernel")
    with pytest.raises(ValueError, match="No inputs were recorded"):
        models.activation_norms(ours, batches, where=r".*word_embeddings/embedding")
    with pytest.raises(ValueError, match="at least one calibration batch"):
        models.activation_norms(ours, [])
