"""Pre-training corpora: texts of named corpora and a run's seeded data volume of them."""

from es_jax.data import corpora


def is_subsequence(part: list[str], whole: list[str]) -> bool:
    """True if `part` is `whole` with some items left out, the rest in their order."""
    remaining = iter(whole)
    return all(any(item == other for other in remaining) for item in part)


def test_several_corpora_are_read_one_after_the_other():
    corpus = corpora.corpus_documents("lee_background")
    assert corpus
    assert all(isinstance(text, str) for text in corpus)
    assert corpora.corpora_documents(["lee_background", "lee_background"]) == corpus * 2


def test_a_data_volume_is_a_seeded_fraction_of_the_corpora_in_order():
    corpus = corpora.corpus_documents("lee_background")
    half = corpora.training_documents(["lee_background"], 0.5, seed=0)
    assert len(half) == round(0.5 * len(corpus))
    assert is_subsequence(half, corpus)
    assert corpora.training_documents(["lee_background"], 0.5, seed=0) == half
    assert corpora.training_documents(["lee_background"], 0.5, seed=1) != half
    assert corpora.training_documents(["lee_background"], 1.0, seed=0) == corpus
