"""The offline tfds builders and the readers over them, plus catalogue names through mock data."""

import concurrent.futures

import numpy as np
import pytest
import tensorflow_datasets as tfds

from es_jax import data
from es_jax.data import builders


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One fresh data dir for the module: every builder runs once here."""
    return tmp_path_factory.mktemp("tfds")


def test_word_pairs_match_the_source_files(data_dir):
    for name, count, first, last_file in [
        ("wordsim353", 353, ("love", "sex", 6.77), "wordsim353.tsv"),
        ("simlex999", 999, ("old", "new", 1.58), "simlex999.txt"),
    ]:
        pairs, human = data.word_pairs(name, data_dir)
        assert len(pairs) == count
        assert human.shape == (count,)
        assert pairs[0] == first[:2]
        assert human[0] == pytest.approx(first[2])
        expected = list(builders.word_pair_lines(builders.gensim_file(last_file)))
        assert pairs == [(w1, w2) for w1, w2, _ in expected]
        np.testing.assert_allclose(human, [s for _, _, s in expected], rtol=1e-6)


def test_lee_similarity_documents_in_file_order_and_symmetric_matrix(data_dir):
    documents, human = data.lee_similarity(data_dir)
    assert len(documents) == 50
    assert documents[0].startswith("The national executive of the strife-torn Democrats")
    assert documents == builders.read_lines(builders.gensim_file("lee.cor"))
    assert human.shape == (50, 50)
    np.testing.assert_array_equal(human, human.T)
    np.testing.assert_array_equal(np.diag(human), np.ones(50, np.float32))
    raw = np.loadtxt(builders.gensim_file("similarities0-1.txt"), dtype=np.float32)
    np.testing.assert_array_equal(np.triu(human), np.triu(raw))


def test_lee_text_is_decoded_from_windows_1252(data_dir):
    documents, _ = data.lee_similarity(data_dir)
    assert any("£3,000" in document for document in documents)


def test_documents_come_back_in_source_order(data_dir):
    background = data.documents("lee_background", data_dir)
    assert len(background) == 300
    assert background == builders.read_lines(builders.gensim_file("lee_background.cor"))
    wikipedia = data.documents("wikipedia", data_dir)
    assert wikipedia[0].startswith("Anarchism is a political philosophy")
    assert 100 <= len(wikipedia) <= 107
    assert 400_000 < sum(len(text.split()) for text in wikipedia) < 500_000
    assert all("'''" not in text for text in wikipedia)


def test_pang_lee_labels_and_sentences(data_dir):
    sentences, labels = data.labelled_sentences("pang_lee", data_dir)
    assert len(sentences) == 200
    assert labels.dtype == np.int32
    assert sorted(set(labels.tolist())) == [0, 1]
    assert sentences[0] == "simplistic , silly and tedious ."
    assert labels[0] == 0
    assert all(not s.startswith("__label__") for s in sentences)


def test_data_source_is_random_access_with_index_feature(data_dir):
    ratings = data.source("lee_similarity/ratings", data_dir=data_dir)
    assert len(ratings) == 1
    background = data.source("lee_background", data_dir=data_dir)
    assert sorted(int(background[i]["index"]) for i in range(len(background))) == list(range(300))


def test_second_read_reuses_the_prepared_dataset(data_dir):
    data.documents("lee_background", data_dir)
    builder = data.local_builder("lee_background", data_dir)
    assert builder.is_prepared()
    assert len(list((data_dir / "es_lee_background").iterdir())) == 1


def test_concurrent_readers_build_a_dataset_once(tmp_path):
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: data.word_pairs("wordsim353", tmp_path), range(3)))
    for pairs, human in results:
        assert pairs == results[0][0]
        np.testing.assert_array_equal(human, results[0][1])
    assert [p.name for p in (tmp_path / "es_wordsim353").iterdir()] == ["1.0.0"]


def test_data_dir_defaults_to_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ES_JAX_DATA_DIR", str(tmp_path))
    assert data.resolve_data_dir() == tmp_path
    monkeypatch.delenv("ES_JAX_DATA_DIR")
    assert data.resolve_data_dir().name == "tensorflow_datasets"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: data.word_pairs("men3000", d), "wordsim353"),
        (lambda d: data.documents("bookcorpus", d), "wikipedia"),
        (lambda d: data.labelled_sentences("imdb", d), "pang_lee"),
        (lambda d: data.source("lee_similarity", data_dir=d), "lee_similarity/documents"),
        (lambda d: data.source("wordsim353/extra", data_dir=d), "no configs"),
    ],
)
def test_bad_names_are_refused_with_the_choices(data_dir, call, message):
    with pytest.raises(ValueError, match=message):
        call(data_dir)


@pytest.mark.parametrize(
    ("name", "split", "fields"),
    [
        ("glue/sst2", "train", {"sentence", "label", "idx"}),
        ("glue/mnli", "validation_matched", {"premise", "hypothesis", "label", "idx"}),
        ("glue/qnli", "train", {"question", "sentence", "label", "idx"}),
        ("glue/qqp", "train", {"question1", "question2", "label", "idx"}),
        ("glue/rte", "train", {"sentence1", "sentence2", "label", "idx"}),
        ("squad/v1.1", "validation", {"id", "title", "context", "question", "answers"}),
        ("cifar10", "test", {"id", "image", "label"}),
        ("cifar100", "train", {"id", "image", "label", "coarse_label"}),
    ],
)
def test_catalogue_names_load_through_tfds(tmp_path, name, split, fields):
    with tfds.testing.mock_data(num_examples=3):
        records = data.source(name, split=split, data_dir=tmp_path)
        assert len(records) == 3
        assert set(records[0]) == fields
