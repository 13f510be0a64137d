"""The small real text-classification tasks (pang_lee, text_source): real records, a seeded
held-out share per seed (repeated random-split cross-validation), fine-tune data for the sweep
and the lth command."""

import numpy as np
import pytest

from es_jax import models
from es_jax.evaluate import tasks


@pytest.mark.parametrize("name", tasks.SPLIT_TEXT_TASKS)
def test_records_are_real_balanced_and_labelled(name):
    records = tasks.labelled_texts(name, None)
    assert len(records) == 200
    labels = [r["label"] for r in records]
    assert sorted(set(labels)) == [0, 1]
    assert sum(labels) == 100
    assert len({r["text"] for r in records}) == len(records)
    assert tasks.num_labels(name) == 2
    assert tasks.get(name).protocol == "finetune"


def test_text_source_labels_say_which_corpus_the_text_opens():
    records = tasks.labelled_texts("text_source", None)
    assert records[0]["text"].startswith("Anarchism")  # the first Wikipedia article
    assert all(len(r["text"].split()) == tasks.SOURCE_WORDS for r in records)


def test_each_seed_holds_out_its_own_fifth():
    splits = [tasks.held_out_split(200, seed) for seed in range(3)]
    for train, held in splits:
        assert len(held) == 40
        assert len(train) == 160
        assert not set(train) & set(held)
    assert not np.array_equal(splits[0][1], splits[1][1])
    np.testing.assert_array_equal(tasks.held_out_split(200, 1)[1], splits[1][1])


def test_finetune_data_trains_on_the_split_and_evaluates_the_held_out_share():
    model, tokenizer = models.load("minilm", task="classification", num_labels=2, seed=0)
    settings = tasks.FinetuneSettings(seed=2, max_length=32, train_batch_size=16, batch_size=16,
                                      num_epochs=2)
    data = tasks.build_finetune("pang_lee", model, tokenizer, settings)
    assert data.evaluator.num_examples == 40
    assert len(data.train) == 2 * (160 // 16)
    batch = data.train[0]
    assert batch["input_ids"].shape == (16, 32)
    assert set(np.unique(batch["label"])) <= {0, 1}
