"""Datasets (tfds sources: offline builders and catalogue names) and grain pipelines."""

from es_jax.data.sources import (
    CATALOGUE,
    data_dir,
    documents,
    labelled_sentences,
    lee_similarity,
    local_builder,
    source,
    word_pairs,
)

__all__ = [
    "CATALOGUE",
    "data_dir",
    "documents",
    "labelled_sentences",
    "lee_similarity",
    "local_builder",
    "source",
    "word_pairs",
]
