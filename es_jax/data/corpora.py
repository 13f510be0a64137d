"""Pre-training corpora: the texts of named corpora and a run's data volume of them.

A corpus is the offline "wikipedia" or "lee_background", or any tfds source with a `text` feature.
Texts come as a `grain.MapDataset` of strings: random access, a record read and decoded only when
its text is asked for, so a host that reads only its share of a tfds corpus never reads the rest
(the offline corpora are small and read whole, to put their records in file order). A run's data
volume is a seeded random fraction of its corpora's documents; fractions with one seed are nested
(the 60% run's documents lie inside the 70% run's). `data_dir` is the tfds data dir (None:
`$ES_JAX_DATA_DIR` or ~/tensorflow_datasets; on a pod, a bucket every host reads).

Held-out text: the first `HELD_OUT_ARTICLES` articles of the offline Wikipedia (140,882 characters)
are never pre-trained on, at any data volume, nor used to train a run's vocabulary. They are the
start of the fixed Wikipedia text that the sweep's `wikitext*` tasks read (`lm_blocks` reads at
most 8 characters a token, so up to 17,610 tokens of it stay inside them), so a pre-training
checkpoint's MLM loss there is measured on text no run has seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain

from es_jax.data.pipelines import subset_positions
from es_jax.data.sources import documents, source

OFFLINE_CORPORA = ("wikipedia", "lee_background")
HELD_OUT_ARTICLES = 3  # leading Wikipedia articles no run trains on
HELD_OUT_CHARACTERS = 140_882  # their length


def held_out_documents(data_dir: str | None = None) -> list[str]:
    """The offline Wikipedia articles reserved for evaluation (see the module docstring)."""
    return documents("wikipedia", data_dir)[:HELD_OUT_ARTICLES]


def corpus_documents(name: str, data_dir: str | None = None) -> grain.MapDataset:
    """Texts a run may train on: the offline "wikipedia" without its held-out articles,
    "lee_background", or a tfds name's `text` (each record read when its text is asked for)."""
    if name == "wikipedia":
        return grain.MapDataset.source(documents(name, data_dir)[HELD_OUT_ARTICLES:])
    if name in OFFLINE_CORPORA:
        return grain.MapDataset.source(documents(name, data_dir))
    return grain.MapDataset.source(source(name, "train", data_dir)).map(record_text)


def record_text(record: dict) -> str:
    """A tfds record's `text` feature as `str` (data sources may hand back bytes)."""
    text = record["text"]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def corpora_documents(names: Sequence[str], data_dir: str | None = None) -> grain.MapDataset:
    """Texts of several corpora, one after the other in the order named."""
    return grain.MapDataset.concatenate([corpus_documents(name, data_dir) for name in names])


def training_documents(
    names: Sequence[str], fraction: float, seed: int, data_dir: str | None = None
) -> grain.MapDataset:
    """A run's data volume: a seeded random `fraction` of the named corpora's documents, in
    their order (`pipelines.subset_positions`)."""
    texts = corpora_documents(names, data_dir)
    positions = subset_positions(len(texts), fraction, seed)
    return grain.MapDataset.source(positions).map(lambda position: texts[int(position)])
