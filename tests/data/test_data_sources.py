"""The offline tfds builders and the readers over them, plus catalogue names through mock data."""

import concurrent.futures
import os
import time
from pathlib import Path

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


def _one_int_feature(builder):
    """The DatasetInfo of a test dataset whose records hold one int `x`."""
    features = tfds.features.FeaturesDict({"x": np.int64})
    return tfds.core.DatasetInfo(builder=builder, features=features)


class EsJaxUnreachable(tfds.core.GeneratorBasedBuilder):
    """A catalogue dataset whose download fails as it does offline, after writing part of it."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return _one_int_feature(self)

    def _split_generators(self, dl_manager):
        partial = Path(dl_manager.download_dir) / "es_jax_unreachable" / "data.zip.tmp"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("half a download")
        raise ConnectionError("Failed to resolve 'data.example.invalid'")

    def _generate_examples(self):
        yield 0, {"x": 0}


class EsJaxReachable(tfds.core.GeneratorBasedBuilder):
    """A catalogue dataset whose download works: three records."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return _one_int_feature(self)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(3):
            yield i, {"x": i}


@pytest.fixture
def online(monkeypatch):
    """Downloads allowed: no variable that turns them off is set."""
    for env in data.sources.OFFLINE_ENVS:
        monkeypatch.delenv(env, raising=False)


def _tree(directory):
    """Every path below `directory`, relative to it."""
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


@pytest.mark.parametrize("env", ["ES_JAX_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_an_unprepared_catalogue_dataset_offline_is_refused_at_once(tmp_path, monkeypatch, env):
    monkeypatch.setenv(env, "1")
    started = time.perf_counter()
    with pytest.raises(ValueError, match="not prepared") as caught:
        data.source("glue/sst2", split="validation", data_dir=tmp_path / "tfds")
    message = str(caught.value)
    assert message.startswith(
        f"dataset 'glue/sst2' is not prepared in {tmp_path / 'tfds'} and downloads are off "
        f"({env}=1): prepare it on a machine with network access (`tfds build glue/sst2 "
        "--data_dir DIR --file_format array_record`"
    )
    assert "$ES_JAX_DATA_DIR" in message
    assert "\n" not in message
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "tfds").exists()


def test_a_failed_download_leaves_nothing_behind(tmp_path, online):
    (tmp_path / "prepared" / "1.0.0").mkdir(parents=True)
    (tmp_path / "downloads" / "other.zip").parent.mkdir()
    (tmp_path / "downloads" / "other.zip").write_text("kept")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="could not be downloaded") as caught:
        data.source("es_jax_unreachable", data_dir=tmp_path)
    message = str(caught.value)
    assert message.startswith(
        f"dataset 'es_jax_unreachable' could not be downloaded into {tmp_path} "
        "(ConnectionError: Failed to resolve 'data.example.invalid'); prepare it on a machine "
        "with network access (`tfds build es_jax_unreachable"
    )
    assert message.endswith("set ES_JAX_OFFLINE=1 to be told at once.")
    assert _tree(tmp_path) == before


def test_a_failed_download_into_a_new_data_dir_removes_it(tmp_path, online):
    with pytest.raises(ValueError, match="could not be downloaded"):
        data.source("es_jax_unreachable", data_dir=tmp_path / "tfds")
    assert not (tmp_path / "tfds").exists()


def test_a_catalogue_dataset_downloads_as_array_record_where_allowed(tmp_path, online):
    records = data.source("es_jax_reachable", data_dir=tmp_path)
    assert sorted(int(records[i]["x"]) for i in range(len(records))) == [0, 1, 2]
    assert list(tmp_path.glob("es_jax_reachable/1.0.0/*.array_record*"))


def test_an_unknown_split_of_a_catalogue_dataset_lists_the_splits(tmp_path, online):
    with pytest.raises(ValueError, match=r"'es_jax_reachable' has no split 'test'; .*\['train'\]"):
        data.source("es_jax_reachable", split="test", data_dir=tmp_path)


@pytest.mark.parametrize("name", ["no_such_dataset", "glue/no_such_config"])
def test_an_unknown_dataset_is_one_line_naming_it(tmp_path, name):
    with pytest.raises(ValueError, match=rf"^unknown dataset '{name}' \(") as caught:
        data.source(name, data_dir=tmp_path)
    assert "\n" not in str(caught.value)
    assert "glue/sst2" in str(caught.value)


@pytest.mark.parametrize("directory", ["/proc/es_jax_data", "/proc"])
def test_a_data_dir_that_cannot_be_written_is_named(directory):
    with pytest.raises(ValueError, match=rf"^data dir {directory} cannot be created or written"):
        data.source("wordsim353", data_dir=directory)


def test_a_corrupt_word_pair_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "pairs.tab"
    path.write_text("# word1\tword2\tscore\ncat\tdog\t7.5\ncat dog 7.5\n")
    with pytest.raises(ValueError, match=rf"{path}: expected .*found 'cat dog 7\.5'"):
        list(builders.word_pair_lines(path))


def test_a_bucket_data_dir_keeps_its_url_and_a_local_one_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("ES_JAX_DATA_DIR", str(tmp_path))
    assert str(data.resolve_data_dir("gs://bucket/tensorflow_datasets")) == (
        "gs://bucket/tensorflow_datasets"
    )
    assert str(data.resolve_data_dir("~/tfds")) == os.path.expanduser("~/tfds")
    assert data.resolve_data_dir("") == tmp_path  # "" (the configs' default) is the environment's
