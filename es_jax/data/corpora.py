"""Pre-training corpora: the texts of named corpora and a run's data volume of them.

A corpus is the offline "wikipedia" or "lee_background", or any tfds source with a `text` feature.
A run's data volume is a seeded random fraction of its corpora's documents; fractions with one seed
are nested (the 60% run's documents lie inside the 70% run's).
"""

from __future__ import annotations

from collections.abc import Sequence

from es_jax.data.pipelines import subset_documents
from es_jax.data.sources import documents, source

OFFLINE_CORPORA = ("wikipedia", "lee_background")


def corpus_documents(name: str) -> list[str]:
    """Texts of a corpus: the offline "wikipedia"/"lee_background", or a tfds name's `text`."""
    if name in OFFLINE_CORPORA:
        return documents(name)
    records = source(name, "train")
    texts = (records[i]["text"] for i in range(len(records)))
    return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]


def corpora_documents(names: Sequence[str]) -> list[str]:
    """Texts of several corpora, one after the other in the order named."""
    return [text for name in names for text in corpus_documents(name)]


def training_documents(names: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A run's data volume: a seeded random `fraction` of the named corpora's documents."""
    return subset_documents(corpora_documents(names), fraction, seed)
