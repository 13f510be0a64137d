"""Masked fine-tuning of a tiny BERT classifier: learns, keeps pruned weights zero, reproducible."""

import re

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from es_jax import models, pruning
from es_jax.models import bert
from es_jax.train import finetune as ft

CONFIG = bert.config_from_hf(
    {
        **models.TINY_HF_CONFIGS["bert"],
        "vocab_size": 64,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
    }
)
SEQ_LEN, BATCH, EPOCHS = 12, 16, 6


def model_fn(rngs):
    """A tiny BERT sequence classifier (stands in for pre-trained weights plus a new head)."""
    return bert.BertForSequenceClassification(CONFIG, num_labels=2, rngs=rngs)


def synthetic_dataset(num_examples=96):
    """A learnable task: label 1 sequences draw from the upper half of the vocabulary."""
    rng = np.random.default_rng(0)
    labels = (np.arange(num_examples) % 2).astype(np.int32)
    half = CONFIG.vocab_size // 2
    ids = rng.integers(1, half, size=(num_examples, SEQ_LEN)) + half * labels[:, None]
    ids = ids.astype(np.int32)
    records = [
        {"input_ids": i, "attention_mask": np.ones(SEQ_LEN, np.int32), "label": y}
        for i, y in zip(ids, labels, strict=True)
    ]
    return (
        grain.MapDataset.source(records)
        .shuffle(seed=0)
        .repeat(EPOCHS)
        .batch(BATCH, drop_remainder=True)
    )


def magnitude_mask(params, sparsity):
    """Per-matrix magnitude mask over the BERT targets (numpy; None on other leaves)."""
    paths = pruning.leaf_paths(params)
    leaves_, treedef = jax.tree.flatten(params)
    masks = []
    for path, leaf in zip(paths, leaves_, strict=True):
        if re.fullmatch(bert.PRUNABLE, path) is None:
            masks.append(None)
            continue
        magnitudes = np.abs(np.asarray(leaf))
        masks.append(magnitudes > np.quantile(magnitudes, sparsity))
    return jax.tree.unflatten(treedef, masks)


def zero_fraction(model, mask):
    """(pruned entries that are not zero, kept entries that are zero, pruned fraction)."""
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    kept = jax.tree.leaves(mask)
    targets = [
        np.asarray(p)
        for p, m in zip(params, jax.tree.leaves(mask, is_leaf=lambda x: x is None), strict=True)
        if m is not None
    ]
    pruned_nonzero = sum(int(np.sum(~m & (p != 0))) for m, p in zip(kept, targets, strict=True))
    kept_zero = sum(int(np.sum(m & (p == 0))) for m, p in zip(kept, targets, strict=True))
    fraction = sum(int(np.sum(p == 0)) for p in targets) / sum(p.size for p in targets)
    return pruned_nonzero, kept_zero, fraction


@pytest.fixture(scope="module")
def dataset():
    """The synthetic training batches (re-iterable from the start)."""
    return synthetic_dataset()


@pytest.fixture(scope="module")
def mask():
    """A 50% global magnitude mask over the BERT target set of the seed-0 model."""
    params = nnx.state(model_fn(nnx.Rngs(0)), nnx.Param)
    return magnitude_mask(params, 0.5)


@pytest.fixture(scope="module")
def config():
    """Paper-style settings with a learning rate a tiny model learns with in a few steps."""
    return ft.finetune_config(learning_rate=5e-3, warmup_steps=4, weight_decay=0.01)


@pytest.fixture(scope="module")
def masked_run(dataset, mask, config):
    """One masked fine-tuning run (model, losses)."""
    return ft.finetune(model_fn, mask, dataset, config, seed=0)


def leaves(model):
    """The model's parameter arrays, in order."""
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_loss_goes_down(masked_run, dataset):
    _, losses = masked_run
    assert len(losses) == len(dataset) == 96 // BATCH * EPOCHS
    assert losses[-6:].mean() < 0.5 * losses[:6].mean()


def test_pruned_weights_stay_exactly_zero(masked_run, mask):
    pruned_nonzero, kept_zero, fraction = zero_fraction(masked_run[0], mask)
    assert pruned_nonzero == 0
    assert kept_zero == 0
    assert fraction == pytest.approx(0.5, abs=1e-3)


def test_same_seed_gives_bitwise_equal_parameters(masked_run, dataset, mask, config):
    again, losses = ft.finetune(model_fn, mask, dataset, config, seed=0)
    for first, second in zip(leaves(masked_run[0]), leaves(again), strict=True):
        np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(masked_run[1], losses)


def test_levels_share_head_init_and_compile_once(masked_run, dataset, mask, config):
    params = nnx.state(model_fn(nnx.Rngs(0)), nnx.Param)
    denser = magnitude_mask(params, 0.2)
    compiled = ft.train_step._cache_size()
    model, _ = ft.finetune(model_fn, denser, dataset, config, seed=0)
    pruned_nonzero, _, fraction = zero_fraction(model, denser)
    assert pruned_nonzero == 0
    assert fraction == pytest.approx(0.2, abs=1e-3)
    all_kept = jax.tree.map(lambda m: np.ones_like(m), mask)
    dense, _ = ft.finetune(model_fn, all_kept, dataset, config, seed=0)
    assert ft.train_step._cache_size() == compiled
    head = lambda m: np.asarray(m.classifier.kernel[...])
    untrained = model_fn(nnx.Rngs(0))
    assert not np.array_equal(head(dense), head(masked_run[0]))
    assert not np.array_equal(head(untrained), head(dense))


def test_schedule_warms_up_then_decays_linearly_to_zero():
    config = ft.finetune_config("mnli", warmup_steps=10)
    schedule = ft.learning_rate_schedule(config, total_steps=110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(2e-5)
    assert float(schedule(60)) == pytest.approx(1e-5)
    assert float(schedule(110)) == 0.0


def test_paper_settings_are_the_defaults():
    squad = ft.finetune_config("squad")
    assert (squad.num_epochs, squad.batch_size, squad.learning_rate) == (3, 16, 3e-5)
    assert squad.objective == "qa"
    mnli = ft.finetune_config("mnli")
    assert (mnli.adam_eps, mnli.weight_decay, mnli.warmup_steps) == (1e-8, 0.0, 0)
    assert ft.finetune_config("cifar10").adam_eps == 2e-8
    assert ft.finetune_config("sst2", learning_rate=1e-4).learning_rate == 1e-4


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ft.finetune_config("cola"), "no paper settings"),
        (lambda: ft.finetune_config("mnli", lr=1e-3), "unknown fine-tuning settings"),
        (lambda: ft.finetune_config(objective="regression"), "objective"),
        (lambda: ft.finetune(model_fn, None, iter([]), ft.finetune_config(), 0), "total_steps"),
        (lambda: ft.finetune(model_fn, None, [], ft.finetune_config(total_steps=3), 0), "ran out"),
    ],
)
def test_bad_settings_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_qa_objective_trains_a_span_head():
    model_fn_qa = lambda rngs: bert.BertForQuestionAnswering(CONFIG, rngs=rngs)
    rng = np.random.default_rng(1)
    batch = {
        "input_ids": rng.integers(0, 64, (4, SEQ_LEN)).astype(np.int32),
        "start_positions": np.array([1, 2, 3, 4], np.int32),
        "end_positions": np.array([2, 3, 4, 5], np.int32),
    }
    config = ft.finetune_config("squad", learning_rate=1e-3)
    _, losses = ft.finetune(model_fn_qa, None, [batch] * 4, config, seed=0)
    assert losses[-1] < losses[0]
    assert np.isfinite(losses).all()
