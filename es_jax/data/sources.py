"""Datasets as tfds data sources: local offline builders by short name, or catalogue names.

`source("wordsim353")` builds the local dataset once into the data dir and reads it back with
`builder.as_data_source`; `source("glue/sst2", split="validation")` goes to `tfds.data_source`
(downloading and preparing where the network allows). The readers below return the offline sets
as plain Python lists in a fixed order (sorted by their `index` feature).
"""

import contextlib
import fcntl
import importlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from es_jax.data.builders import LOCAL_BUILDERS

DATA_DIR_ENV = "ES_JAX_DATA_DIR"
CATALOGUE = (
    "glue/mnli",
    "glue/qnli",
    "glue/qqp",
    "glue/sst2",
    "glue/rte",
    "squad/v1.1",
    "cifar10",
    "cifar100",
)
# Catalogue families whose builder module tfds does not register on `import tensorflow_datasets`.
_CATALOGUE_MODULES = {"glue": "tensorflow_datasets.text.glue"}


def resolve_data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data dir: `path`, else `$ES_JAX_DATA_DIR`, else `~/tensorflow_datasets`."""
    if path is not None:
        return Path(path).expanduser()
    return Path(os.environ.get(DATA_DIR_ENV, "~/tensorflow_datasets")).expanduser()


@contextlib.contextmanager
def _build_lock(directory: Path, name: str) -> Iterator[None]:
    """An exclusive file lock, so concurrent processes build a dataset only once."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f".es_jax_build_{name.replace('/', '_')}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def local_builder(name: str, data_dir_path: str | os.PathLike | None = None):
    """The prepared tfds builder of a local dataset (`name` or `name/config`), built if needed."""
    family, _, config = name.partition("/")
    if family not in LOCAL_BUILDERS:
        raise ValueError(
            f"unknown local dataset {name!r}; local datasets are {sorted(LOCAL_BUILDERS)}"
        )
    builder_cls = LOCAL_BUILDERS[family]
    configs = [c.name for c in builder_cls.BUILDER_CONFIGS]
    if configs and config not in configs:
        choices = [f"{family}/{c}" for c in configs]
        raise ValueError(f"dataset {family!r} needs a config: use one of {choices}")
    if not configs and config:
        raise ValueError(f"dataset {family!r} has no configs; use {family!r}")
    directory = resolve_data_dir(data_dir_path)
    kwargs = {"config": config} if config else {}
    with _build_lock(directory, name):
        builder = builder_cls(data_dir=str(directory), file_format="array_record", **kwargs)
        if not builder.is_prepared():
            builder.download_and_prepare()
    return builder


def _catalogue_builder_module(name: str) -> None:
    """Import the module that registers a catalogue family tfds leaves unregistered."""
    module = _CATALOGUE_MODULES.get(name.split("/")[0])
    if module is not None:
        importlib.import_module(module)


def source(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None
) -> Sequence[dict]:
    """A random-access tfds data source of one split (records come back unordered)."""
    if name.split("/")[0] in LOCAL_BUILDERS:
        return local_builder(name, data_dir).as_data_source(split=split)
    _catalogue_builder_module(name)
    return tfds.data_source(name, split=split, data_dir=str(resolve_data_dir(data_dir)))


def _text(value: str | bytes) -> str:
    """A tfds Text feature as `str` (data sources may hand back bytes)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _records_by_index(name: str, data_dir_path: str | os.PathLike | None) -> list[dict]:
    """Every record of a local dataset's train split, sorted by its `index` feature."""
    records = source(name, "train", data_dir_path)
    records = [records[i] for i in range(len(records))]
    return sorted(records, key=lambda record: int(record["index"]))


def word_pairs(
    name: str, data_dir: str | os.PathLike | None = None
) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Word pairs and their mean human scores (file order) for "wordsim353" or "simlex999"."""
    if name not in ("wordsim353", "simlex999"):
        raise ValueError(f"word_pairs takes 'wordsim353' or 'simlex999', not {name!r}")
    records = _records_by_index(name, data_dir)
    pairs = [(_text(r["word1"]), _text(r["word2"])) for r in records]
    return pairs, np.array([float(r["score"]) for r in records], dtype=np.float32)


def lee_similarity(data_dir: str | os.PathLike | None = None) -> tuple[list[str], np.ndarray]:
    """The 50 Lee documents (file order) and their symmetric 50x50 mean human ratings."""
    documents = [_text(r["text"]) for r in _records_by_index("lee_similarity/documents", data_dir)]
    ratings = source("lee_similarity/ratings", "train", data_dir)
    return documents, np.asarray(ratings[0]["human"], dtype=np.float32)


def documents(name: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Texts of "wikipedia" (one per article, dump order) or "lee_background" (file order)."""
    if name not in ("wikipedia", "lee_background"):
        raise ValueError(f"documents takes 'wikipedia' or 'lee_background', not {name!r}")
    return [_text(r["text"]) for r in _records_by_index(name, data_dir)]


def labelled_sentences(
    name: str = "pang_lee", data_dir: str | os.PathLike | None = None
) -> tuple[list[str], np.ndarray]:
    """Sentences (file order) and int labels (0 = negative, 1 = positive) of "pang_lee"."""
    if name != "pang_lee":
        raise ValueError(f"labelled_sentences takes 'pang_lee', not {name!r}")
    records = _records_by_index(name, data_dir)
    labels = np.array([int(r["label"]) for r in records], dtype=np.int32)
    return [_text(r["text"]) for r in records], labels
