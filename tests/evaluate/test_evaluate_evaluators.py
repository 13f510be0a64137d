"""Evaluators on tiny random models: correct values, one compilation for many parameter sets,
pruning levels applied inside the forward pass, the same values on a 4x2 device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from es_jax import mesh, pruning
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


def numpy_perplexity(embedding: np.ndarray, kernel: np.ndarray, bias: np.ndarray, ids) -> float:
    """Perplexity of TinyCausalLM's logits (embedding rows @ kernel + bias) in float64 numpy."""
    logits = embedding[ids].astype(np.float64) @ kernel.astype(np.float64) + bias
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(np.exp(-np.take_along_axis(log_probs[:, :-1], ids[:, 1:, None], -1).mean()))


@pytest.fixture(scope="module")
def lm_setup():
    """A TinyCausalLM large enough to be FSDP-sharded (8,192-weight matrices), its token ids,
    and nested levels (0.3, 0.6, 0.9) over its embedding and head kernel by magnitude."""
    ids = np.random.default_rng(5).integers(1, 128, size=(16, 6))
    model = TinyCausalLM(vocab=128, hidden=64, rngs=nnx.Rngs(5))
    _, params, _ = evaluators.split_params(model)
    scores = pruning.magnitude(params, where=r"(embed/embedding|head/kernel)")
    levels = pruning.levels(scores, [0.3, 0.6, 0.9])
    return model, ids, params, levels


def test_masking_inside_the_forward_pass_equals_the_pruned_copy_and_numpy(lm_setup):
    model, ids, params, levels = lm_setup
    evaluator = evaluators.perplexity(model, batches_of(ids, 8), task="toy")
    embedding = np.asarray(params["embed"]["embedding"])
    kernel = np.asarray(params["head"]["kernel"])
    bias = np.asarray(params["head"]["bias"], np.float64)
    for index in range(3):
        masked = evaluator(params, levels, index)
        copy = evaluator(pruning.apply(params, pruning.mask_at(levels, index)))
        keep_embedding = np.asarray(levels["embed"]["embedding"]) > index
        keep_kernel = np.asarray(levels["head"]["kernel"]) > index
        expected = numpy_perplexity(embedding * keep_embedding, kernel * keep_kernel, bias, ids)
        assert masked == pytest.approx(copy, rel=1e-6)
        assert masked == pytest.approx(expected, rel=1e-4)
    dense = numpy_perplexity(embedding, kernel, bias, ids)
    assert evaluator(params, levels, evaluators.DENSE) == pytest.approx(dense, rel=1e-4)
    assert evaluator(params) == pytest.approx(dense, rel=1e-4)


def test_the_dense_model_and_every_level_share_one_compiled_program(lm_setup):
    model, ids, params, levels = lm_setup
    evaluator = evaluators.perplexity(model, batches_of(ids, 8), task="toy")
    values = [evaluator(params, levels, index) for index in (evaluators.DENSE, 0, 1, 2)]
    assert evaluator.compilations() == 1
    assert len(set(values)) == 4  # every level prunes other weights
    evaluator(params)  # an unmasked call is a program of its own
    assert evaluator.compilations() == 2


def test_an_evaluator_on_a_4x2_mesh_equals_the_single_device_one(lm_setup):
    model, ids, params, levels = lm_setup
    device_mesh = mesh.make_mesh(4, 2)
    sharded_params = mesh.shard(params, device_mesh)
    sharded_levels = mesh.shard(levels, device_mesh)
    assert sharded_params["head"]["kernel"].sharding.spec == P(None, "fsdp")
    assert sharded_levels["head"]["kernel"].sharding.spec == P(None, "fsdp")
    single = evaluators.perplexity(model, batches_of(ids, 8), task="toy")
    on_mesh = evaluators.perplexity(model, batches_of(ids, 8), task="toy", mesh=device_mesh)
    for index in (evaluators.DENSE, 0, 2):
        assert on_mesh(sharded_params, sharded_levels, index) == pytest.approx(
            single(params, levels, index), rel=1e-5
        )
    assert on_mesh.compilations() == 1


def test_mesh_batches_are_split_over_every_device_and_outputs_replicated(lm_setup):
    model, ids, params, _ = lm_setup
    device_mesh = mesh.make_mesh(4, 2)
    (placed,) = evaluators.device_batches(batches_of(ids[:8], 8), ("input_ids",), device_mesh)
    assert placed["input_ids"].sharding.spec == P(mesh.MESH_AXES)
    assert len(placed["input_ids"].addressable_shards) == 8
    forward = evaluators.make_forward(model, evaluators.causal_lm_nll, device_mesh)
    keys = ("input_ids", "attention_mask", "weights")
    (batch,) = evaluators.device_batches(batches_of(ids[:8], 8), keys, device_mesh)
    nll, tokens = forward(mesh.shard(params, device_mesh), batch)
    assert nll.sharding.is_fully_replicated
    assert tokens.sharding.is_fully_replicated
    assert float(tokens) == 8 * 5


def test_a_batch_that_does_not_split_over_the_mesh_is_refused(lm_setup):
    model, ids, _, _ = lm_setup
    with pytest.raises(ValueError, match="a batch of 4 rows does not split over the mesh's 8"):
        evaluators.perplexity(model, batches_of(ids, 4), task="toy", mesh=mesh.make_mesh(4, 2))


class ShiftedCausalLM(TinyCausalLM):
    """TinyCausalLM whose logits are shifted by a non-parameter state variable (as an RNG
    counter or a running statistic is state the model updates when it runs)."""

    def __init__(self, *, rngs: nnx.Rngs):
        super().__init__(rngs=rngs)
        self.shift = nnx.BatchStat(jnp.zeros((50,)))

    def __call__(self, input_ids, attention_mask=None):
        return super().__call__(input_ids) + self.shift[...]


def test_an_evaluator_keeps_the_model_state_it_was_built_with():
    ids = np.random.default_rng(6).integers(1, 50, size=(4, 6))
    model = ShiftedCausalLM(rngs=nnx.Rngs(6))
    evaluator = evaluators.perplexity(model, batches_of(ids, 2), task="toy")
    _, params, _ = evaluators.split_params(model)
    before = evaluator(params)
    model.shift[...] = jnp.arange(50.0)  # the model's own state changes after the build
    assert evaluator(params) == before
    assert evaluator.compilations() == 1
    assert evaluators.perplexity(model, batches_of(ids, 2), task="toy")(params) != before
