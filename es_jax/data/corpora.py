"""Pre-training corpora: the texts of named corpora and a run's data volume of them.

A corpus is the offline "wikipedia" or "lee_background", or any tfds source with a `text` feature.
A run's data volume is a seeded random fraction of its corpora's documents; fractions with one seed
are nested (the 60% run's documents lie inside the 70% run's).

Held-out text: the first `HELD_OUT_ARTICLES` articles of the offline Wikipedia (140,882 characters)
are never pre-trained on, at any data volume, nor used to train a run's vocabulary. They are the
start of the fixed Wikipedia text that the sweep's `wikitext*` tasks read (`lm_blocks` reads at
most 8 characters a token, so up to 17,610 tokens of it stay inside them), so a pre-training
checkpoint's MLM loss there is measured on text no run has seen.
"""

from __future__ import annotations

from collections.abc import Sequence

from es_jax.data.pipelines import subset_documents
from es_jax.data.sources import documents, source

OFFLINE_CORPORA = ("wikipedia", "lee_background")
HELD_OUT_ARTICLES = 3  # leading Wikipedia articles no run trains on
HELD_OUT_CHARACTERS = 140_882  # their length


def held_out_documents() -> list[str]:
    """The offline Wikipedia articles reserved for evaluation (see the module docstring)."""
    return documents("wikipedia")[:HELD_OUT_ARTICLES]


def corpus_documents(name: str) -> list[str]:
    """Texts a run may train on: the offline "wikipedia" without its held-out articles,
    "lee_background", or a tfds name's `text`."""
    if name == "wikipedia":
        return documents(name)[HELD_OUT_ARTICLES:]
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
