"""Datasets as tfds data sources: local offline builders by short name, or catalogue names.

`source("wordsim353")` builds the local dataset once into the data dir and reads it back with
`builder.as_data_source`; `source("glue/sst2", split="validation")` reads the catalogue dataset
prepared (as array_record) in the data dir, downloading and preparing it first unless downloads are
off (`$ES_JAX_OFFLINE=1`, or `$HF_DATASETS_OFFLINE=1`): then a dataset not prepared there is refused
at once with how to provide it. A failed download leaves no partial folders behind.
`source("fashion_mnist")` reads the local builder over the Debian package's files where they are
installed, else the catalogue's dataset (`is_local`). The readers below return the offline sets
as plain Python lists in a fixed order (sorted by their `index` feature).
"""

import contextlib
import fcntl
import importlib
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from es_jax.data.builders import LOCAL_BUILDERS
from es_jax.data.image_builders import fashion_mnist_installed

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
    "fashion_mnist",
)
# Catalogue families whose builder module tfds does not register on `import tensorflow_datasets`.
_CATALOGUE_MODULES = {"glue": "tensorflow_datasets.text.glue"}
# Set to 1 / true / yes, either turns catalogue downloads off (the first is es_jax's own).
OFFLINE_ENVS = ("ES_JAX_OFFLINE", "HF_DATASETS_OFFLINE")
# How deep below the data dir a failed download's new files and folders are looked for.
_CLEANUP_DEPTH = 3


def resolve_data_dir(path: str | os.PathLike | None = None) -> epath.Path:
    """The data dir: `path` (unless None or ""), else `$ES_JAX_DATA_DIR`, else
    `~/tensorflow_datasets`; a bucket URL (gs://...) kept whole, a local path with `~` expanded."""
    name = os.fspath(path) if path else os.environ.get(DATA_DIR_ENV) or "~/tensorflow_datasets"
    return epath.Path(name if "://" in name else os.path.expanduser(name))


@contextlib.contextmanager
def _build_lock(directory: epath.Path, name: str) -> Iterator[None]:
    """An exclusive file lock, so concurrent processes build a dataset only once (none on a
    bucket, which has no locks: prepare a bucket's data once, from one host, before a run)."""
    if "://" in os.fspath(directory):
        yield
        return
    path = directory / f".es_jax_build_{name.replace('/', '_')}.lock"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(path, "w")  # noqa: SIM115 (closed below, after the build)
    except OSError as error:
        raise ValueError(
            f"data dir {directory} cannot be created or written ({error.strerror}); point "
            f"data_dir or ${DATA_DIR_ENV} at a writable folder."
        ) from error
    with lock:
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
    probe = builder_cls(data_dir=str(directory), file_format="array_record", **kwargs)
    with _absl_errors_only():  # tfds warns of each unprepared version folder it looks at
        if probe.is_prepared():  # a read-only data dir prepared elsewhere needs no lock
            # A builder reads the dataset's info when it is made: the probe may predate a
            # concurrent build's final rename (then it knows no splits), so make it again.
            return builder_cls(data_dir=str(directory), file_format="array_record", **kwargs)
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
    if is_local(name):
        return local_builder(name, data_dir).as_data_source(split=split)
    builder = catalogue_builder(name, resolve_data_dir(data_dir))
    with _absl_errors_only():  # tfds warns of each unprepared version folder it looks at
        prepared = builder.is_prepared()
    if not prepared:
        download_and_prepare(builder, name)
    return catalogue_split(builder, name, split)


def is_local(name: str) -> bool:
    """Whether `source(name)` reads a local builder rather than the tfds catalogue.

    True for the families of LOCAL_BUILDERS, except "fashion_mnist" where the Debian package's
    IDX files are not installed: then the catalogue's `fashion_mnist` is read.
    """
    family = name.split("/")[0]
    if family == "fashion_mnist":
        return fashion_mnist_installed()
    return family in LOCAL_BUILDERS


def downloads_off() -> str | None:
    """The environment variable that turns catalogue downloads off (`NAME=value`), or None."""
    for env in OFFLINE_ENVS:
        value = os.environ.get(env, "")
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return f"{env}={value}"
    return None


def catalogue_builder(name: str, directory: Path) -> Any:
    """The tfds builder of a catalogue dataset in `directory` (array_record); nothing is written."""
    _catalogue_builder_module(name)
    try:
        with _absl_errors_only():
            return tfds.builder(name, data_dir=str(directory), file_format="array_record")
    except ValueError as error:  # tfds.core.registered.DatasetNotFoundError and unknown configs
        raise ValueError(
            f"unknown dataset {name!r} ({_first_line(error)}); local datasets are "
            f"{sorted(LOCAL_BUILDERS)}, catalogue ones used here {list(CATALOGUE)}."
        ) from None


@contextlib.contextmanager
def _absl_errors_only() -> Iterator[None]:
    """Silences absl's warnings (not its errors) while the block runs."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def provide_hint(name: str, directory: Path) -> str:
    """How to provide a catalogue dataset that cannot be downloaded here."""
    return (
        f"prepare it on a machine with network access (`tfds build {name} --data_dir DIR "
        "--file_format array_record`, or run the same command there), copy DIR here and point "
        f"data_dir or ${DATA_DIR_ENV} at it (now {directory})"
    )


def download_and_prepare(builder: Any, name: str) -> None:
    """Downloads and prepares `builder`'s dataset, or refuses at once when downloads are off.

    A failed download removes every file and folder it created under the data dir.
    """
    directory = Path(builder.data_dir_root)
    off = downloads_off()
    if off:
        raise ValueError(
            f"dataset {name!r} is not prepared in {directory} and downloads are off ({off}): "
            f"{provide_hint(name, directory)}."
        )
    before = _paths_below(directory)
    try:
        builder.download_and_prepare()
    except BaseException as error:
        _remove_new_paths(directory, before)
        if not isinstance(error, Exception):
            raise
        raise ValueError(
            f"dataset {name!r} could not be downloaded into {directory} ({type(error).__name__}: "
            f"{_first_line(error)}); {provide_hint(name, directory)}; without network, set "
            f"{OFFLINE_ENVS[0]}=1 to be told at once."
        ) from error


def catalogue_split(builder: Any, name: str, split: str) -> Sequence[dict]:
    """One split of a prepared catalogue dataset as a data source; ValueError naming what fails."""
    splits = list(builder.info.splits)
    if splits and split not in splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; its splits are {splits}.")
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError as error:  # prepared in a format without random access
        raise ValueError(
            f"dataset {name!r} in {builder.data_dir} is prepared as {builder.info.file_format}, "
            f"which es_jax cannot read at random: rebuild it with `tfds build {name} --data_dir "
            f"{builder.data_dir_root} --file_format array_record`."
        ) from error


def _paths_below(directory: Path) -> set[Path] | None:
    """Every file and folder at most `_CLEANUP_DEPTH` levels below `directory`; None if absent."""
    if not directory.exists():
        return None
    found: set[Path] = set()
    level = [directory]
    for _ in range(_CLEANUP_DEPTH):
        level = [child for folder in level if folder.is_dir() for child in folder.iterdir()]
        found.update(level)
    return found


def _remove_new_paths(directory: Path, before: set[Path] | None) -> None:
    """Removes what appeared under `directory` since `before` (the whole folder if it was new)."""
    if before is None:
        shutil.rmtree(directory, ignore_errors=True)
        return
    new = sorted((_paths_below(directory) or set()) - before)
    for path in new:
        if path.parent in new:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (the type's name if it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


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
