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


def test_held_out_wikipedia_is_never_trained_on_and_holds_the_evaluation_text():
    from es_jax import data
    from es_jax.evaluate.tasks import text_prefix

    articles = data.documents("wikipedia")
    held_out = corpora.held_out_documents()
    assert held_out == articles[: corpora.HELD_OUT_ARTICLES]
    assert sum(map(len, held_out)) == corpora.HELD_OUT_CHARACTERS
    trainable = corpora.training_documents(["wikipedia", "lee_background"], 1.0, 0)
    assert not set(held_out) & set(trainable)
    assert set(articles[corpora.HELD_OUT_ARTICLES :]) <= set(trainable)
    # The wikitext tasks' fixed text at the largest length the reservation covers.
    assert text_prefix(articles, corpora.HELD_OUT_CHARACTERS) == held_out
