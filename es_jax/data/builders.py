"""tfds builders (array_record, no TensorFlow) for the offline text and evaluation sets.

The raw files ship with gensim's test data (see the shared DATA.md). Each builder writes one
`train` split of records that carry an `index` feature (the record's position in the source
file), because tfds data sources return records in shuffled order.
"""

import bz2
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

LEE_DOCUMENTS = 50
WIKIPEDIA_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_SOURCE_ENCODING = "cp1252"  # lee.cor and pang_lee_polarity.cor are Windows-1252 text


def gensim_file(name: str) -> Path:
    """Path of one of gensim's bundled test-data files, with a clear error when it is missing."""
    try:
        from gensim.test.utils import datapath
    except ImportError as error:
        raise ValueError(
            f"building the offline dataset from {name!r} needs gensim's test data: "
            "pip install gensim (or es-jax[offline])"
        ) from error
    path = Path(datapath(name))
    if not path.exists():
        raise ValueError(f"gensim test-data file {path} is missing; reinstall gensim")
    return path


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file, decoded from Windows-1252 (a superset of ASCII)."""
    text = path.read_bytes().decode(_SOURCE_ENCODING)
    return [line.strip() for line in text.splitlines() if line.strip()]


def clean_wiki_text(text: str) -> str:
    """Plain paragraphs from `filter_wiki` output: drop bold/italic quotes and blank runs."""
    text = re.sub(r"'{2,}", "", text)
    paragraphs = (re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n"))
    return "\n".join(p for p in paragraphs if p)


def wikipedia_articles(dump: Path) -> Iterator[tuple[str, int, str]]:
    """(title, page id, cleaned text) of the dump's main-namespace articles, redirects skipped."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.BZ2File(dump) as stream:
        for title, markup, page_id in extract_pages(stream, filter_namespaces=("0",)):
            if markup.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = clean_wiki_text(filter_wiki(markup))
            if text:
                yield title, int(page_id), text


def word_pair_lines(path: Path) -> Iterator[tuple[str, str, float]]:
    """(word1, word2, mean human score) from a tab-separated file with `#` comment lines."""
    for line in read_lines(path):
        if line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 3 or not _is_number(fields[2]):
            raise ValueError(
                f"{path}: expected 'word1<TAB>word2<TAB>score' lines, found {line!r}; the file "
                "is corrupt: reinstall gensim"
            )
        yield fields[0], fields[1], float(fields[2])


def _is_number(text: str) -> bool:
    """Whether `text` reads as a float."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def lee_human_matrix(path: Path) -> np.ndarray:
    """The 50x50 symmetric matrix of mean human ratings (the file holds the upper triangle)."""
    upper = np.loadtxt(path, dtype=np.float32)
    if upper.shape != (LEE_DOCUMENTS, LEE_DOCUMENTS):
        raise ValueError(f"{path}: expected a 50x50 matrix, found {upper.shape}")
    return np.triu(upper) + np.triu(upper, 1).T


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: one `train` split generated from a local file, no downloads."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}  # noqa: RUF012 (tfds reads a class dict)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This module's file (tfds's own lookup fails when es_jax resolves as a namespace)."""
        return epath.Path(inspect.getfile(cls))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        """A single `train` split."""
        del dl_manager
        return {"train": self._generate_examples()}


class EsWikipedia(_OfflineBuilder):
    """English Wikipedia sample (gensim's shortened dump): one record per article."""

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: index, title, page_id, text."""
        return tfds.core.DatasetInfo(
            builder=self,
            description="English Wikipedia articles extracted with gensim's extract_pages and "
            "filter_wiki (redirects skipped, bold/italic quotes removed).",
            features=tfds.features.FeaturesDict(
                {
                    "index": np.int32,
                    "title": tfds.features.Text(),
                    "page_id": np.int64,
                    "text": tfds.features.Text(),
                }
            ),
        )

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        """One example per article, in dump order."""
        articles = wikipedia_articles(gensim_file(WIKIPEDIA_DUMP))
        for index, (title, page_id, text) in enumerate(articles):
            yield index, {"index": index, "title": title, "page_id": page_id, "text": text}


class EsLeeBackground(_OfflineBuilder):
    """Lee background corpus: 300 news articles, one a line."""

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: index, text."""
        return tfds.core.DatasetInfo(
            builder=self,
            description="Lee background news corpus (gensim lee_background.cor).",
            features=tfds.features.FeaturesDict({"index": np.int32, "text": tfds.features.Text()}),
        )

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        """One example per line."""
        for index, text in enumerate(read_lines(gensim_file("lee_background.cor"))):
            yield index, {"index": index, "text": text}


class EsLeeSimilarity(_OfflineBuilder):
    """Lee et al. document similarity: config `documents` (50 texts), `ratings` (the matrix)."""

    BUILDER_CONFIGS = [  # noqa: RUF012 (tfds reads a class list)
        tfds.core.BuilderConfig(name="documents", description="The 50 news documents."),
        tfds.core.BuilderConfig(
            name="ratings", description="One record holding the 50x50 mean human ratings."
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        """Documents: index, text. Ratings: one record with `human` (50, 50) float32."""
        if self.builder_config.name == "documents":
            features = {"index": np.int32, "text": tfds.features.Text()}
        else:
            shape = (LEE_DOCUMENTS, LEE_DOCUMENTS)
            features = {"human": tfds.features.Tensor(shape=shape, dtype=np.float32)}
        return tfds.core.DatasetInfo(
            builder=self,
            description="Lee et al. (2005) document similarity: gensim lee.cor and "
            "similarities0-1.txt, the matrix made symmetric from its upper triangle.",
            features=tfds.features.FeaturesDict(features),
        )

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        """The documents in file order, or the single matrix record."""
        if self.builder_config.name == "ratings":
            yield 0, {"human": lee_human_matrix(gensim_file("similarities0-1.txt"))}
            return
        documents = read_lines(gensim_file("lee.cor"))
        if len(documents) != LEE_DOCUMENTS:
            raise ValueError(f"lee.cor: expected 50 documents, found {len(documents)}")
        for index, text in enumerate(documents):
            yield index, {"index": index, "text": text}


class _WordPairBuilder(_OfflineBuilder, skip_registration=True):
    """Word pairs with a mean human similarity score."""

    SOURCE_FILE = ""

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: index, word1, word2, score."""
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Word-similarity pairs from gensim's {self.SOURCE_FILE}.",
            features=tfds.features.FeaturesDict(
                {
                    "index": np.int32,
                    "word1": tfds.features.Text(),
                    "word2": tfds.features.Text(),
                    "score": np.float32,
                }
            ),
        )

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        """One example per pair, in file order."""
        pairs = word_pair_lines(gensim_file(self.SOURCE_FILE))
        for index, (word1, word2, score) in enumerate(pairs):
            yield index, {"index": index, "word1": word1, "word2": word2, "score": score}


class EsWordsim353(_WordPairBuilder):
    """WordSim-353: 353 word pairs."""

    SOURCE_FILE = "wordsim353.tsv"


class EsSimlex999(_WordPairBuilder):
    """SimLex-999: 999 word pairs."""

    SOURCE_FILE = "simlex999.txt"


class EsPangLee(_OfflineBuilder):
    """Pang & Lee movie-review polarity sample: 200 labelled sentences."""

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: index, text, label (neg=0, pos=1)."""
        return tfds.core.DatasetInfo(
            builder=self,
            description="Pang & Lee sentence polarity sample (gensim pang_lee_polarity.cor).",
            features=tfds.features.FeaturesDict(
                {
                    "index": np.int32,
                    "text": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=["neg", "pos"]),
                }
            ),
        )

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        """One example per line; the `__label__` prefix becomes the label."""
        for index, line in enumerate(read_lines(gensim_file("pang_lee_polarity.cor"))):
            tag, _, text = line.partition(" ")
            if tag not in ("__label__neg", "__label__pos"):
                raise ValueError(f"pang_lee_polarity.cor line {index + 1}: unknown label {tag!r}")
            label = tag.removeprefix("__label__")
            yield index, {"index": index, "text": text.strip(), "label": label}


# The image builders subclass _OfflineBuilder above, so they are imported once it exists.
from es_jax.data.image_builders import EsDigits, EsFashionMnist  # noqa: E402

# "fashion_mnist" is read from the tfds catalogue instead where the Debian files are absent
# (sources.is_local).
LOCAL_BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "wikipedia": EsWikipedia,
    "lee_background": EsLeeBackground,
    "lee_similarity": EsLeeSimilarity,
    "wordsim353": EsWordsim353,
    "simlex999": EsSimlex999,
    "pang_lee": EsPangLee,
    "fashion_mnist": EsFashionMnist,
    "digits": EsDigits,
}
