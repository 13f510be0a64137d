"""Datasets (tfds sources: offline builders and catalogue names) and grain pipelines.

Readers (lists in a fixed order; local sets are built once into the data dir):
  word_pairs(name) -> (pairs, human)          "wordsim353" | "simlex999"
  lee_similarity() -> (documents, human 50x50)
  documents(name) -> list[str]                "wikipedia" (dump order) | "lee_background"
  labelled_sentences("pang_lee") -> (sentences, labels)
  source(name, split) -> tfds data source     local short names or catalogue names
  image_arrays(name, split) -> ImageSet       "fashion_mnist" (train | test) | "digits" (train)
  question_set(data, split) -> list[Question] MMLU-format folder | "tfds:NAME" | "facts" (bundled)
Pipelines (grain):
  padded_batches, length_sorted_batches, packed_lm_dataset, token_blocks, subset_documents,
  tokenize_padded
Images (es_jax.data.images; uint8 until to_unit_range maps them to float32 x / 127.5 - 1):
  pretraining_dataset(images, "supervised" | "multicrop", ...)   endless augmented grain batches
  evaluation_batches(images, batch_size, image_size), padded_image_batch
  MultiCrop, multi_crop, supervised_view, random_resized_crop, crop_box, horizontal_flip,
  intensity_jitter, gaussian_blur, solarize
Pre-training corpora and vocabularies (es_jax.data.corpora, es_jax.data.wordpiece):
  corpus_documents(name, data_dir), training_documents(names, fraction, seed, data_dir)
      -> grain.MapDataset[str] (records read when their text is needed)
  cached_wordpiece(path, corpora, vocab_size), train_wordpiece, WordPieceTokenizer
Fine-tuning tasks (es_jax.data.tasks):
  classification_dataset(name, split, ...)    GLUE mnli/qnli/qqp/sst2/rte and pang_lee
  squad_features(records, ...), feature_batches(features, ...)
"""

from es_jax.data.corpora import corpus_documents, training_documents
from es_jax.data.images import (
    CropBox,
    ImageSet,
    MultiCrop,
    crop_box,
    evaluation_batches,
    gaussian_blur,
    horizontal_flip,
    image_arrays,
    intensity_jitter,
    multi_crop,
    padded_image_batch,
    pretraining_dataset,
    random_resized_crop,
    solarize,
    supervised_view,
    to_unit_range,
)
from es_jax.data.multiple_choice import Question, question_set
from es_jax.data.pipelines import (
    host_shard,
    length_sorted_batches,
    packed_lm_dataset,
    padded_batches,
    subset_documents,
    token_blocks,
    tokenize_padded,
)
from es_jax.data.sources import (
    CATALOGUE,
    documents,
    is_local,
    labelled_sentences,
    lee_similarity,
    local_builder,
    resolve_data_dir,
    source,
    word_pairs,
)
from es_jax.data.tasks import (
    CLASSIFICATION_TASKS,
    classification_batches,
    classification_dataset,
    classification_task,
    feature_batches,
    squad_features,
)
from es_jax.data.wordpiece import (
    SPECIAL_TOKENS,
    WordPieceTokenizer,
    cached_wordpiece,
    train_wordpiece,
)

__all__ = [
    "CATALOGUE",
    "CLASSIFICATION_TASKS",
    "SPECIAL_TOKENS",
    "CropBox",
    "ImageSet",
    "MultiCrop",
    "Question",
    "WordPieceTokenizer",
    "cached_wordpiece",
    "classification_batches",
    "classification_dataset",
    "classification_task",
    "corpus_documents",
    "crop_box",
    "documents",
    "evaluation_batches",
    "feature_batches",
    "gaussian_blur",
    "horizontal_flip",
    "host_shard",
    "image_arrays",
    "intensity_jitter",
    "is_local",
    "labelled_sentences",
    "lee_similarity",
    "length_sorted_batches",
    "local_builder",
    "multi_crop",
    "packed_lm_dataset",
    "padded_batches",
    "padded_image_batch",
    "pretraining_dataset",
    "question_set",
    "random_resized_crop",
    "resolve_data_dir",
    "solarize",
    "source",
    "squad_features",
    "subset_documents",
    "supervised_view",
    "to_unit_range",
    "token_blocks",
    "tokenize_padded",
    "train_wordpiece",
    "training_documents",
    "word_pairs",
]
