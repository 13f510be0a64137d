"""Evaluators on tiny random models: correct values, one compilation for many parameter sets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from es_jax.evaluate import evaluators, metrics


class TinyEncoder(nnx.Module):
    """Embedding + one linear layer: (B, L) ids -> (B, L, H) hidden states."""

    def __init__(self, vocab: int = 50, hidden: int = 8, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, hidden, rngs=rngs)
        self.dense = nnx.Linear(hidden, hidden, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        return jnp.tanh(self.dense(self.embed(input_ids)))


class TinyCausalLM(nnx.Module):
    """Embedding + linear head: (B, L) ids -> (B, L, V) logits, no context at all."""

    def __init__(self, vocab: int = 50, hidden: int = 8, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, vocab, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids))


def batches_of(ids: np.ndarray, batch_size: int) -> list[dict]:
    """Fixed-shape batches with a zero-weight padded tail, as the data pipelines yield them."""
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        real = len(chunk)
        chunk = np.concatenate([chunk, np.zeros((batch_size - real, ids.shape[1]), ids.dtype)])
        mask = (chunk > 0).astype(np.int32)
        mask[real:] = 0
        weights = np.array([1.0] * real + [0.0] * (batch_size - real), np.float32)
        out.append({"input_ids": chunk, "attention_mask": mask, "weights": weights})
    return out


def scaled(params, factor: float):
    """The parameters times a factor (a stand-in for another sparsity level)."""
    return jax.tree.map(lambda x: x * factor, params)


@pytest.fixture(scope="module")
def word_setup():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(11)]
    ids = rng.integers(1, 50, size=(11, 4))
    pairs = [(words[i], words[(i * 3 + 1) % 11]) for i in range(11)]
    human = rng.uniform(0, 10, size=11)
    return words, ids, pairs, human


def test_word_pair_similarity_matches_numpy_and_compiles_once(word_setup):
    words, ids, pairs, human = word_setup
    model = TinyEncoder(rngs=nnx.Rngs(0))
    evaluator = evaluators.word_pair_similarity(
        model, batches_of(ids, 4), words, pairs, human, task="toy"
    )
    _, params, _ = evaluators.split_params(model)
    values = [evaluator(scaled(params, f)) for f in (1.0, 0.5, 0.25, 2.0)]
    assert evaluator.compilations() == 1
    hidden = np.asarray(model(jnp.asarray(ids)))
    mask = (ids > 0)[..., None]
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    index = {w: i for i, w in enumerate(words)}
    cosines = [pooled[index[a]] @ pooled[index[b]] for a, b in pairs]
    assert values[0] == pytest.approx(metrics.spearman_x100(np.array(cosines), human), abs=1e-3)
    assert evaluator.metric == "spearman"
    assert evaluator.higher_is_better


def test_document_similarity_uses_the_upper_triangle():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 50, size=(6, 5))
    model = TinyEncoder(rngs=nnx.Rngs(1))
    hidden = np.asarray(model(jnp.asarray(ids))).mean(1)
    hidden /= np.linalg.norm(hidden, axis=1, keepdims=True)
    human = hidden @ hidden.T  # a human matrix the model agrees with perfectly
    evaluator = evaluators.document_similarity(model, batches_of(ids, 4), human, task="toy")
    _, params, _ = evaluators.split_params(model)
    assert evaluator(params) == pytest.approx(100.0)
    assert evaluator.num_examples == 15


def test_document_similarity_refuses_a_matrix_of_the_wrong_size():
    ids = np.ones((6, 5), np.int64)
    with pytest.raises(ValueError, match="human matrix"):
        evaluators.document_similarity(
            TinyEncoder(rngs=nnx.Rngs(0)), batches_of(ids, 4), np.eye(5), task="toy"
        )


def test_empty_evaluation_set_is_refused():
    batch = batches_of(np.ones((1, 3), np.int64), 2)
    batch[0]["weights"][:] = 0
    with pytest.raises(ValueError, match="empty after filtering"):
        evaluators.perplexity(TinyCausalLM(rngs=nnx.Rngs(0)), batch, task="toy")


def test_perplexity_matches_numpy_and_ignores_padding_rows():
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 50, size=(5, 6))
    model = TinyCausalLM(rngs=nnx.Rngs(2))
    evaluator = evaluators.perplexity(model, batches_of(ids, 2), task="toy")
    _, params, _ = evaluators.split_params(model)
    value = evaluator(params)
    logits = np.asarray(model(jnp.asarray(ids)), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs[:, :-1], ids[:, 1:, None], -1).mean()
    assert value == pytest.approx(np.exp(nll), rel=1e-4)
    for factor in (0.9, 0.8, 0.7):
        evaluator(scaled(params, factor))
    assert evaluator.compilations() == 1
    assert not evaluator.higher_is_better


def test_lm_loss_is_log_perplexity():
    ids = np.random.default_rng(3).integers(1, 50, size=(4, 6))
    model = TinyCausalLM(rngs=nnx.Rngs(3))
    _, params, _ = evaluators.split_params(model)
    loss = evaluators.lm_loss(model, batches_of(ids, 2), task="toy")(params)
    ppl = evaluators.perplexity(model, batches_of(ids, 2), task="toy")(params)
    assert np.exp(loss) == pytest.approx(ppl, rel=1e-5)


def test_mask_tokens_is_seeded_and_spares_special_and_padding_tokens():
    ids = np.array([[101, 5, 6, 7, 8, 9, 102, 0]] * 50)
    mask = (ids > 0).astype(np.int32)
    masked, labels = evaluators.mask_tokens(ids, mask, 103, [101, 102], rate=0.5, seed=0)
    again, _ = evaluators.mask_tokens(ids, mask, 103, [101, 102], rate=0.5, seed=0)
    np.testing.assert_array_equal(masked, again)
    assert np.all(labels[:, [0, 6, 7]] == -1)
    chosen = labels >= 0
    assert 0.3 < chosen[:, 1:6].mean() < 0.7
    np.testing.assert_array_equal(masked[chosen], 103)
    np.testing.assert_array_equal(labels[chosen], ids[chosen])


class TinyClassifier(nnx.Module):
    """Mean of embeddings -> linear head with 3 classes."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(50, 8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.head(self.embed(input_ids).mean(1))


def test_classification_accuracy_matches_argmax():
    rng = np.random.default_rng(4)
    ids = rng.integers(1, 50, size=(7, 4))
    model = TinyClassifier(rngs=nnx.Rngs(4))
    predicted = np.asarray(model(jnp.asarray(ids))).argmax(-1)
    labels = predicted.copy()
    labels[:3] = (labels[:3] + 1) % 3  # three wrong
    batches = batches_of(ids, 3)
    for i, b in enumerate(batches):
        chunk = labels[3 * i : 3 * i + 3]
        b["label"] = np.concatenate([chunk, np.zeros(3 - len(chunk), np.int64)])
    evaluator = evaluators.classification(model, batches, task="toy")
    _, params, _ = evaluators.split_params(model)
    assert evaluator(params) == pytest.approx(100 * 4 / 7)
    assert evaluator.num_examples == 7
