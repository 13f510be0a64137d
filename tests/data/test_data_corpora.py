"""Pre-training corpora: texts of named corpora and a run's seeded data volume of them."""

import grain

from es_jax.data import corpora


def is_subsequence(part: list[str], whole: list[str]) -> bool:
    """True if `part` is `whole` with some items left out, the rest in their order."""
    remaining = iter(whole)
    return all(any(item == other for other in remaining) for item in part)


def test_several_corpora_are_read_one_after_the_other():
    corpus = list(corpora.corpus_documents("lee_background"))
    assert len(corpus) == 300
    assert all(isinstance(text, str) for text in corpus)
    both = corpora.corpora_documents(["lee_background", "lee_background"])
    assert isinstance(both, grain.MapDataset)
    assert list(both) == corpus * 2
    assert both[300] == corpus[0]


def test_a_data_volume_is_a_seeded_fraction_of_the_corpora_in_order():
    corpus = list(corpora.corpus_documents("lee_background"))
    half = list(corpora.training_documents(["lee_background"], 0.5, seed=0))
    assert len(half) == round(0.5 * len(corpus))
    assert is_subsequence(half, corpus)
    assert list(corpora.training_documents(["lee_background"], 0.5, seed=0)) == half
    assert list(corpora.training_documents(["lee_background"], 0.5, seed=1)) != half
    assert list(corpora.training_documents(["lee_background"], 1.0, seed=0)) == corpus


class RecordLog(list):
    """A tfds data source stand-in that records which records were read."""

    def __init__(self, records):
        super().__init__(records)
        self.read = []

    def __getitem__(self, index):
        self.read.append(index)
        return super().__getitem__(index)


def test_a_tfds_corpus_is_read_a_record_at_a_time_from_the_data_dir(monkeypatch):
    records = RecordLog([{"text": f"text {i}".encode()} for i in range(6)])
    asked = []
    monkeypatch.setattr(corpora, "source", lambda *args: asked.append(args) or records)
    texts = corpora.training_documents(["my_corpus"], 0.5, seed=0, data_dir="/bucket/tfds")
    assert asked == [("my_corpus", "train", "/bucket/tfds")]
    assert records.read == []
    assert len(texts) == 3
    third = texts[2]
    assert records.read == [int(third.split()[1])]  # that record alone, decoded to str
    assert third == f"text {records.read[0]}"


def test_held_out_wikipedia_is_never_trained_on_and_holds_the_evaluation_text():
    from es_jax import data
    from es_jax.evaluate.tasks import text_prefix

    articles = data.documents("wikipedia")
    held_out = corpora.held_out_documents()
    assert held_out == articles[: corpora.HELD_OUT_ARTICLES]
    assert sum(map(len, held_out)) == corpora.HELD_OUT_CHARACTERS
    trainable = list(corpora.training_documents(["wikipedia", "lee_background"], 1.0, 0))
    assert not set(held_out) & set(trainable)
    assert set(articles[corpora.HELD_OUT_ARTICLES :]) <= set(trainable)
    # The wikitext tasks' fixed text at the largest length the reservation covers.
    assert text_prefix(articles, corpora.HELD_OUT_CHARACTERS) == held_out
