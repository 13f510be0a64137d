"""Fine-tuning task pipelines: sentence(-pair) classification (GLUE, Pang-Lee) and SQuAD spans.

Classification batches come from a tfds source through grain, tokenised per batch: training
batches are shuffled with a seed (a new order each epoch) and full; evaluation batches keep the
source order and pad the last batch (weights 0). SQuAD examples are cut into features with a
document stride; training features carry the answer's token span, evaluation features carry
the offset mapping needed to turn logits back into text.
"""

import dataclasses
import os
from collections.abc import Sequence

import grain
import numpy as np

from es_jax.data.pipelines import host_shard, tokenize_padded
from es_jax.data.sources import source


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
    """A labelled sentence(-pair) dataset: tfds name, text fields, labels, evaluation split."""

    dataset: str
    fields: tuple[str, ...]
    num_labels: int
    eval_split: str
    label_field: str = "label"


CLASSIFICATION_TASKS = {
    "mnli": ClassificationTask("glue/mnli", ("premise", "hypothesis"), 3, "validation_matched"),
    "qnli": ClassificationTask("glue/qnli", ("question", "sentence"), 2, "validation"),
    "qqp": ClassificationTask("glue/qqp", ("question1", "question2"), 2, "validation"),
    "sst2": ClassificationTask("glue/sst2", ("sentence",), 2, "validation"),
    "rte": ClassificationTask("glue/rte", ("sentence1", "sentence2"), 2, "validation"),
    "pang_lee": ClassificationTask("pang_lee", ("text",), 2, "train"),
}


def classification_task(name: str) -> ClassificationTask:
    """The task spec of `name`, with the known names in the error."""
    if name not in CLASSIFICATION_TASKS:
        raise ValueError(
            f"unknown classification task {name!r}; known: {sorted(CLASSIFICATION_TASKS)}"
        )
    return CLASSIFICATION_TASKS[name]


def _text(value: str | bytes) -> str:
    """A tfds Text feature as `str`."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def encode_classification(
    records: Sequence[dict], task: ClassificationTask, tokenizer, max_len: int, batch_size: int
) -> dict[str, np.ndarray]:
    """One padded batch (see `tokenize_padded`) plus int32 `label` from a list of records."""
    texts = [
        tuple(_text(r[f]) for f in task.fields)
        if len(task.fields) > 1
        else _text(r[task.fields[0]])
        for r in records
    ]
    batch = tokenize_padded(texts, tokenizer, max_len, batch_size)
    labels = np.zeros(batch_size, np.int32)
    labels[: len(records)] = [int(r[task.label_field]) for r in records]
    batch["label"] = labels
    return batch


def classification_batches(
    records: Sequence[dict],
    task: ClassificationTask,
    tokenizer,
    max_len: int,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    num_epochs: int = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.MapDataset:
    """Batches of a random-access record source (a tfds data source or a list of dicts).

    train=True: this host's shard, shuffled with `seed` (a new order each epoch), repeated
    `num_epochs` times, full batches only. train=False: source order, last batch padded.
    """
    if len(records) == 0:
        raise ValueError(f"task {task.dataset!r} has no records")
    index, count = host_shard(shard_index, shard_count)
    dataset = grain.MapDataset.source(records)[index::count]
    if train:
        dataset = dataset.shuffle(seed=seed).repeat(num_epochs)
    dataset = dataset.batch(batch_size, drop_remainder=train, batch_fn=list)
    return dataset.map(
        lambda rows: encode_classification(rows, task, tokenizer, max_len, batch_size)
    )


def classification_dataset(
    name: str,
    split: str,
    tokenizer,
    max_len: int,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    num_epochs: int = 1,
    data_dir: str | os.PathLike | None = None,
) -> grain.MapDataset:
    """`classification_batches` over a named task's tfds split (see CLASSIFICATION_TASKS)."""
    task = classification_task(name)
    records = source(task.dataset, split=split, data_dir=data_dir)
    return classification_batches(
        records, task, tokenizer, max_len, batch_size, train=train, seed=seed, num_epochs=num_epochs
    )


def _squad_answer(record: dict) -> tuple[int, str]:
    """(character start, text) of a SQuAD record's first answer."""
    answers = record["answers"]
    return int(np.asarray(answers["answer_start"]).ravel()[0]), _text(
        np.asarray(answers["text"]).ravel()[0]
    )


def squad_features(
    records: Sequence[dict], tokenizer, max_len: int, doc_stride: int, *, train: bool
) -> dict[str, np.ndarray]:
    """Question/context features, one per window of `max_len` tokens with stride `doc_stride`.

    Always: int32 `input_ids`, `attention_mask`, `token_type_ids` (if made), `example_index`
    (row of `records`), `offsets` (n, max_len, 2) character spans of context tokens (-1 for
    question, special and padding tokens). train=True adds `start_positions`/`end_positions`:
    the answer's token span, or (0, 0) (the [CLS] token) when the window does not hold it.
    """
    if doc_stride >= max_len:
        raise ValueError(f"doc_stride {doc_stride} must be smaller than max_len {max_len}")
    questions = [_text(r["question"]).lstrip() for r in records]
    contexts = [_text(r["context"]) for r in records]
    encoded = tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_len,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    example_index = np.asarray(encoded["overflow_to_sample_mapping"], np.int32)
    offsets = np.full((len(example_index), max_len, 2), -1, np.int32)
    for row in range(len(example_index)):
        for position, segment in enumerate(encoded.sequence_ids(row)):
            if segment == 1:
                offsets[row, position] = encoded["offset_mapping"][row][position]
    features = {
        key: np.asarray(encoded[key], np.int32)
        for key in ("input_ids", "attention_mask", "token_type_ids")
        if key in encoded
    }
    features["example_index"] = example_index
    features["offsets"] = offsets
    if train:
        starts, ends = (
            np.zeros(len(example_index), np.int32),
            np.zeros(len(example_index), np.int32),
        )
        for row, example in enumerate(example_index):
            char_start, text = _squad_answer(records[example])
            char_end = char_start + len(text)
            inside = np.nonzero(offsets[row, :, 0] >= 0)[0]
            if inside.size == 0:
                continue
            first, last = offsets[row, inside[0], 0], offsets[row, inside[-1], 1]
            if char_start < first or char_end > last:
                continue
            starts[row] = inside[offsets[row, inside, 0] <= char_start][-1]
            ends[row] = inside[offsets[row, inside, 1] >= char_end][0]
        features["start_positions"], features["end_positions"] = starts, ends
    return features


def feature_batches(
    features: dict[str, np.ndarray],
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    num_epochs: int = 1,
) -> grain.MapDataset:
    """Batches of precomputed feature rows (e.g. `squad_features`), like classification_batches.

    Evaluation batches are padded to `batch_size` with zero rows and a `weights` mask.
    """
    num_rows = len(next(iter(features.values())))
    if num_rows == 0:
        raise ValueError("feature_batches got no feature rows")
    dataset = grain.MapDataset.range(num_rows)
    if train:
        dataset = dataset.shuffle(seed=seed).repeat(num_epochs)
    dataset = dataset.batch(batch_size, drop_remainder=train)

    def gather(rows: np.ndarray) -> dict[str, np.ndarray]:
        """The rows of every feature, zero-padded to the batch size."""
        batch = {}
        for key, values in features.items():
            padded = np.zeros((batch_size, *values.shape[1:]), values.dtype)
            padded[: len(rows)] = values[rows]
            batch[key] = padded
        batch["weights"] = (np.arange(batch_size) < len(rows)).astype(np.float32)
        return batch

    return dataset.map(gather)
