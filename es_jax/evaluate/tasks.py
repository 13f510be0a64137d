"""The tasks a sweep can evaluate, by name: what metric, what kind of model, how to build it.

A task turns (model, tokenizer, settings) into an `Evaluator` whose batches are tokenised once.
Zero-shot tasks run on the pre-trained model as it is (embedding similarity on an encoder,
perplexity and multiple-choice accuracy on a causal LM, MLM loss on a masked LM, k-NN accuracy of
an image backbone's [CLS] features); fine-tune tasks (GLUE, SQuAD, CIFAR, Fashion-MNIST with a few
labels per class, digits) need a fresh head and masked fine-tuning first, which the sweep does
before calling the evaluator. Images are scaled to [0, 1], given the model's channel count and
square size, and normalised per channel as the model expects (`Normalisation`: [-1, 1] unless
the checkpoint's preprocessor says otherwise).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from es_jax.data.images import UNIT_RANGE, Normalisation
from es_jax.evaluate import evaluators

# The kinds of model a task needs; the sweep checks them against the model before any work.
ENCODER = "encoder"  # a base encoder returning hidden states (B, L, H)
CAUSAL_LM = "causal_lm"
MASKED_LM = "mlm"
CLASSIFIER = "classification"  # a text classifier
IMAGE_CLASSIFIER = "image_classification"
IMAGE_ENCODER = "image_encoder"  # an image backbone returning hidden states (B, 1 + patches, H)
QUESTION_ANSWERING = "qa"


@dataclass(frozen=True)
class TaskSettings:
    """Data and batching settings of the zero-shot task builders."""

    data_dir: str = ""  # '' = the data package's default
    seed: int = 0
    batch_size: int = 16
    max_length: int = 256  # tokens per document or sentence
    word_max_length: int = 16  # tokens per word
    max_examples: int = 0  # keep the first N documents / pairs (0 = all)
    lm_length: int = 256  # tokens per block of the fixed Wikipedia text
    lm_blocks: int = 16  # blocks of the fixed Wikipedia text
    # mmlu: the questions (an MMLU-format folder, "tfds:NAME" or a bundled set such as "facts"),
    # solved examples per prompt (from the dev split), and "letter" or "text" continuations.
    mc_data: str = "facts"
    mc_shots: int = 0
    mc_style: str = "letter"
    # k-NN over image features: the bank is the fine-tune twin's training images of `seed`.
    max_train_examples: int = 0
    labels_per_class: int = 100
    image_size: int = 224  # images are resized to this square size (the model's)
    normalisation: Normalisation = UNIT_RANGE
    # The device mesh the evaluator runs on (batches split over all its devices, so batch_size
    # must divide by its device count); None = the default device.
    mesh: Mesh | None = None


@dataclass(frozen=True)
class Task:
    """A named evaluation: its metric, the model head it needs, and its protocol."""

    name: str
    metric: str
    higher_is_better: bool
    head: str
    protocol: str  # "zero_shot" or "finetune"
    description: str


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("lee", "spearman", True, ENCODER, "zero_shot", "Lee document similarity"),
        Task("wordsim353", "spearman", True, ENCODER, "zero_shot", "WordSim-353 word pairs"),
        Task("simlex999", "spearman", True, ENCODER, "zero_shot", "SimLex-999 word pairs"),
        Task("wikitext", "perplexity", False, CAUSAL_LM, "zero_shot", "Wikipedia perplexity"),
        Task("wikitext_loss", "lm_loss", False, CAUSAL_LM, "zero_shot", "Wikipedia LM loss"),
        Task("wikitext_mlm", "mlm_loss", False, MASKED_LM, "zero_shot", "Wikipedia MLM loss"),
        Task("mmlu", "accuracy", True, CAUSAL_LM, "zero_shot", "MMLU-format multiple choice"),
        Task("glue/mnli", "accuracy", True, CLASSIFIER, "finetune", "MNLI matched accuracy"),
        Task("glue/qnli", "accuracy", True, CLASSIFIER, "finetune", "QNLI accuracy"),
        Task("glue/qqp", "accuracy", True, CLASSIFIER, "finetune", "QQP accuracy"),
        Task("glue/sst2", "accuracy", True, CLASSIFIER, "finetune", "SST-2 accuracy"),
        Task("glue/rte", "accuracy", True, CLASSIFIER, "finetune", "RTE accuracy"),
        Task("squad/v1.1", "f1", True, QUESTION_ANSWERING, "finetune", "SQuAD v1.1 F1"),
        Task(
            "pang_lee", "accuracy", True, CLASSIFIER, "finetune",
            "Pang-Lee movie-review polarity, a seeded 20% held out",
        ),
        Task(
            "text_source", "accuracy", True, CLASSIFIER, "finetune",
            "Wikipedia vs Lee news sentences, a seeded 20% held out",
        ),
        Task("cifar10", "accuracy", True, IMAGE_CLASSIFIER, "finetune", "CIFAR-10 top-1 accuracy"),
        Task(
            "cifar100", "accuracy", True, IMAGE_CLASSIFIER, "finetune", "CIFAR-100 top-1 accuracy"
        ),
        Task(
            "fashion_mnist_few", "accuracy", True, IMAGE_CLASSIFIER, "finetune",
            "Fashion-MNIST, a seeded labels_per_class training images per class; test accuracy",
        ),
        Task(
            "digits", "accuracy", True, IMAGE_CLASSIFIER, "finetune",
            "8x8 handwritten digits, a seeded 20% held out",
        ),
        Task(
            "fashion_knn", "accuracy", True, IMAGE_ENCODER, "zero_shot",
            "k-NN accuracy of [CLS] features, fashion_mnist_few's images",
        ),
        Task(
            "digits_knn", "accuracy", True, IMAGE_ENCODER, "zero_shot",
            "k-NN accuracy of [CLS] features, digits' split",
        ),
    )
}


def get(name: str) -> Task:
    """The task of this name; ValueError listing the known tasks otherwise."""
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown task {name!r}{hint}; known tasks are {sorted(TASKS)}.")
    return TASKS[name]


def _limited(items: list, max_examples: int) -> list:
    """The first `max_examples` items (all of them when max_examples <= 0)."""
    return items if max_examples <= 0 else items[:max_examples]


def token_budget(settings: TaskSettings) -> int:
    """Tokens in one text batch of an entry: batch_size x max_length (a word batch holds as
    many, in more and shorter rows)."""
    return settings.batch_size * settings.max_length


def build_lee(model: nnx.Module, tokenizer: Any, settings: TaskSettings) -> evaluators.Evaluator:
    """Lee: embeddings of the 50 documents, cosine vs the human matrix (1,225 pairs)."""
    from es_jax import data

    documents, human = data.lee_similarity(settings.data_dir or None)
    n = len(_limited(documents, settings.max_examples))
    batches = data.length_sorted_batches(
        documents[:n], tokenizer, settings.max_length, settings.batch_size, token_budget(settings)
    )
    return evaluators.document_similarity(
        model, batches, human[:n, :n], task="lee", mesh=settings.mesh
    )


def build_word_pairs(
    name: str, model: nnx.Module, tokenizer: Any, settings: TaskSettings
) -> evaluators.Evaluator:
    """WordSim-353 / SimLex-999: embeddings of each word alone, cosine per pair."""
    from es_jax import data

    pairs, human = data.word_pairs(name, settings.data_dir or None)
    pairs = _limited(pairs, settings.max_examples)
    human = human[: len(pairs)]
    words = sorted({word for pair in pairs for word in pair})
    batches = data.length_sorted_batches(
        words, tokenizer, settings.word_max_length, settings.batch_size, token_budget(settings)
    )
    return evaluators.word_pair_similarity(
        model, batches, words, pairs, human, task=name, mesh=settings.mesh
    )


def text_prefix(documents: list[str], characters: int) -> list[str]:
    """The first documents whose total length reaches `characters` (all if they never do)."""
    total = 0
    for i, document in enumerate(documents):
        total += len(document)
        if total >= characters:
            return documents[: i + 1]
    return documents


def lm_blocks(
    documents: list[str], tokenizer: Any, length: int, count: int, batch_size: int
) -> list[dict[str, np.ndarray]]:
    """The first `count` token blocks of `length` of the documents joined in order, batched.

    The text is a fixed prefix of the corpus, the same at every level and every run. Only as
    many documents are tokenised as needed (about 8 characters per token is an upper bound for
    English BPE and WordPiece).
    """
    from es_jax.data.pipelines import token_blocks

    prefix = text_prefix(documents, characters=8 * length * count)
    blocks = token_blocks(prefix, tokenizer, length)[:count]
    batches = []
    for start in range(0, len(blocks), batch_size):
        chunk = blocks[start : start + batch_size]
        real = len(chunk)
        padded = np.zeros((batch_size, length), np.int32)
        padded[:real] = chunk
        mask = np.zeros((batch_size, length), np.int32)
        mask[:real] = 1
        weights = (np.arange(batch_size) < real).astype(np.float32)
        batches.append({"input_ids": padded, "attention_mask": mask, "weights": weights})
    return batches


def calibration_batches(
    tokenizer: Any,
    data_dir: str,
    length: int,
    blocks: int,
    batch_size: int,
    corpus: str = "lee_background",
) -> list[dict[str, np.ndarray]]:
    """Calibration inputs (Wanda, SparseGPT): the first `blocks` of `length` tokens of a corpus
    ("lee_background" news by default, which no evaluation reads, or "wikipedia")."""
    from es_jax import data

    documents = data.documents(corpus, data_dir or None)
    batches = lm_blocks(documents, tokenizer, length, blocks, batch_size)
    # Every calibration token counts, so a short last batch loses its padding rows.
    real = [int(b["weights"].sum()) for b in batches]
    return [{k: b[k][:n] for k in ("input_ids", "attention_mask")}
            for b, n in zip(batches, real, strict=True) if n]


def wikipedia_blocks(tokenizer: Any, settings: TaskSettings) -> list[dict[str, np.ndarray]]:
    """The fixed Wikipedia text as `lm_blocks` of `lm_length` tokens."""
    from es_jax import data

    documents = data.documents("wikipedia", settings.data_dir or None)
    return lm_blocks(
        documents, tokenizer, settings.lm_length, settings.lm_blocks, settings.batch_size
    )


def build_wikitext(
    metric: str, model: nnx.Module, tokenizer: Any, settings: TaskSettings
) -> evaluators.Evaluator:
    """Perplexity or LM loss of a causal LM on the fixed Wikipedia text."""
    batches = wikipedia_blocks(tokenizer, settings)
    if metric == "perplexity":
        return evaluators.perplexity(model, batches, task="wikitext", mesh=settings.mesh)
    return evaluators.lm_loss(model, batches, task="wikitext_loss", mesh=settings.mesh)


def build_wikitext_mlm(
    model: nnx.Module, tokenizer: Any, settings: TaskSettings
) -> evaluators.Evaluator:
    """MLM loss on the fixed Wikipedia text with a fixed 15% of tokens masked."""
    batches = wikipedia_blocks(tokenizer, settings)
    special = [i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id) if i is not None]
    for i, batch in enumerate(batches):
        batch["input_ids"], batch["mlm_labels"] = evaluators.mask_tokens(
            batch["input_ids"],
            batch["attention_mask"],
            tokenizer.mask_token_id,
            special,
            seed=settings.seed + i,
        )
    return evaluators.mlm_loss(model, batches, task="wikitext_mlm", mesh=settings.mesh)


def build_mmlu(model: nnx.Module, tokenizer: Any, settings: TaskSettings) -> evaluators.Evaluator:
    """Multiple-choice accuracy of a causal LM on the first `max_examples` test questions of
    `mc_data`, scored by choice log-likelihoods (es_jax.evaluate.multiple_choice)."""
    from es_jax import data
    from es_jax.evaluate import multiple_choice

    data_dir = settings.data_dir or None
    questions = data.question_set(settings.mc_data, "test", data_dir)
    questions = _limited(questions, settings.max_examples)
    dev = data.question_set(settings.mc_data, "dev", data_dir) if settings.mc_shots > 0 else []
    return multiple_choice.multiple_choice(
        model,
        tokenizer,
        questions,
        dev,
        shots=settings.mc_shots,
        style=settings.mc_style,
        max_length=settings.max_length,
        batch_size=settings.batch_size,
        task="mmlu",
    )


ZERO_SHOT_BUILDERS: dict[str, Callable[[nnx.Module, Any, TaskSettings], evaluators.Evaluator]] = {
    "lee": build_lee,
    "wordsim353": lambda m, t, s: build_word_pairs("wordsim353", m, t, s),
    "simlex999": lambda m, t, s: build_word_pairs("simlex999", m, t, s),
    "wikitext": lambda m, t, s: build_wikitext("perplexity", m, t, s),
    "wikitext_loss": lambda m, t, s: build_wikitext("lm_loss", m, t, s),
    "wikitext_mlm": build_wikitext_mlm,
    "mmlu": build_mmlu,
    "fashion_knn": lambda m, t, s: build_knn("fashion_knn", m, s),
    "digits_knn": lambda m, t, s: build_knn("digits_knn", m, s),
}


def build_zero_shot(
    name: str, model: nnx.Module, tokenizer: Any, settings: TaskSettings
) -> evaluators.Evaluator:
    """The evaluator of a zero-shot task on this model."""
    return ZERO_SHOT_BUILDERS[get(name).name](model, tokenizer, settings)


# ----------------------------------------------------------------------------------------------
# Fine-tune tasks: training batches and an evaluator on the held-out split.


@dataclass(frozen=True)
class FinetuneSettings:
    """Data settings of the fine-tune task builders."""

    data_dir: str = ""
    seed: int = 0
    batch_size: int = 32  # evaluation batch size
    train_batch_size: int = 32
    num_epochs: int = 3
    max_length: int = 128
    max_examples: int = 0  # keep the first N evaluation examples (0 = all)
    max_train_examples: int = 0  # keep the first N training examples (0 = all)
    doc_stride: int = 128  # SQuAD
    image_size: int = 224  # vision: images are resized to this square size (the model's)
    labels_per_class: int = 100  # fashion_mnist_few: training images per class
    normalisation: Normalisation = UNIT_RANGE  # vision: what the model expects of pixels


@dataclass(frozen=True)
class FinetuneData:
    """What one fine-tune task needs at every level: training batches and an evaluator."""

    train: Any  # a sized iterable of batches (grain.MapDataset), re-iterated from its start
    evaluator: evaluators.Evaluator


IMAGE_CLASSES = {"cifar10": 10, "cifar100": 100, "fashion_mnist_few": 10, "digits": 10}
SPLIT_TEXT_TASKS = ("pang_lee", "text_source")  # small real sets: a seeded held-out share
HELD_OUT = 0.2
SOURCE_WORDS = 40  # words of each document's opening in text_source
SOURCE_DOCUMENTS = 100  # documents of each corpus in text_source


def num_labels(name: str) -> int | None:
    """Classes of a fine-tune classification task (None for SQuAD)."""
    from es_jax.data import tasks as data_tasks

    if name in IMAGE_CLASSES:
        return IMAGE_CLASSES[name]
    if name in SPLIT_TEXT_TASKS:
        return 2
    if name.startswith("glue/"):
        return data_tasks.classification_task(name.split("/", 1)[1]).num_labels
    return None


def _first(records: Any, limit: int) -> list:
    """The first `limit` records of a random-access source (all when limit <= 0)."""
    count = len(records) if limit <= 0 else min(limit, len(records))
    return [records[i] for i in range(count)]


def _eval_batches(dataset: Any) -> list[dict[str, np.ndarray]]:
    """A finite evaluation dataset as a list of batches."""
    return [dataset[i] for i in range(len(dataset))]


def build_glue(name: str, model: nnx.Module, tokenizer: Any, s: FinetuneSettings) -> FinetuneData:
    """GLUE: shuffled training batches and accuracy on the evaluation split."""
    from es_jax import data
    from es_jax.data import tasks as data_tasks

    short = name.split("/", 1)[1]
    spec = data_tasks.classification_task(short)
    data_dir = s.data_dir or None
    train_records = _first(data.source(spec.dataset, "train", data_dir), s.max_train_examples)
    eval_records = _first(data.source(spec.dataset, spec.eval_split, data_dir), s.max_examples)
    return classification_data(name, model, tokenizer, s, spec, train_records, eval_records)


def classification_data(
    name: str,
    model: nnx.Module,
    tokenizer: Any,
    s: FinetuneSettings,
    spec: Any,
    train_records: list,
    eval_records: list,
) -> FinetuneData:
    """Shuffled training batches of `train_records` and accuracy on `eval_records`."""
    from es_jax.data import tasks as data_tasks

    train = data_tasks.classification_batches(
        train_records,
        spec,
        tokenizer,
        s.max_length,
        s.train_batch_size,
        train=True,
        seed=s.seed,
        num_epochs=s.num_epochs,
    )
    batches = _eval_batches(
        data_tasks.classification_batches(
            eval_records, spec, tokenizer, s.max_length, s.batch_size, train=False
        )
    )
    return FinetuneData(train, evaluators.classification(model, batches, task=name))


def build_squad(name: str, model: nnx.Module, tokenizer: Any, s: FinetuneSettings) -> FinetuneData:
    """SQuAD v1.1: span features with a document stride; F1 of the best span per question."""
    from es_jax import data
    from es_jax.data import tasks as data_tasks

    data_dir = s.data_dir or None
    train_records = _first(data.source(name, "train", data_dir), s.max_train_examples)
    eval_records = _first(data.source(name, "validation", data_dir), s.max_examples)
    stride = min(s.doc_stride, s.max_length // 2)
    train_features = data_tasks.squad_features(
        train_records, tokenizer, s.max_length, stride, train=True
    )
    train = data_tasks.feature_batches(
        train_features, s.train_batch_size, train=True, seed=s.seed, num_epochs=s.num_epochs
    )
    features = data_tasks.squad_features(eval_records, tokenizer, s.max_length, stride, train=False)
    batches = _eval_batches(data_tasks.feature_batches(features, s.batch_size, train=False))
    contexts = [_text(r["context"]) for r in eval_records]
    rows = [
        {
            "example_id": int(example),
            "context": contexts[example],
            "offsets": features["offsets"][row],
            "context_mask": features["offsets"][row, :, 0] >= 0,
        }
        for row, example in enumerate(features["example_index"])
    ]
    answers = {
        i: [_text(t) for t in np.asarray(r["answers"]["text"]).ravel()]
        for i, r in enumerate(eval_records)
    }
    return FinetuneData(train, evaluators.question_answering(model, batches, rows, answers, name))


def _text(value: str | bytes) -> str:
    """A tfds Text feature as `str`."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def encode_images(
    rows: list[dict],
    batch_size: int,
    image_size: int,
    channels: int = 3,
    normalisation: Normalisation = UNIT_RANGE,
) -> dict[str, np.ndarray]:
    """One padded batch of records ({"image", "label"}): `images.padded_image_batch`."""
    from es_jax.data import images

    return images.padded_image_batch(
        np.stack([np.asarray(r["image"]) for r in rows]), [int(r["label"]) for r in rows],
        batch_size, image_size, channels, normalisation,
    )


class ImageInput(NamedTuple):
    """What a vision model takes: its square image size, channels and pixel normalisation."""

    size: int
    channels: int
    normalisation: Normalisation


def image_input(model: nnx.Module, image_size: int, normalisation: Normalisation) -> ImageInput:
    """The model's image input; ValueError when the model entry's `image_size` is not the size
    the model was built for."""
    config = model.config
    if config.image_size != image_size:
        raise ValueError(
            f"image_size={image_size}, but the model takes {config.image_size}x"
            f"{config.image_size} images; set the model entry's image_size to {config.image_size}."
        )
    return ImageInput(config.image_size, config.num_channels, normalisation)


def image_batches(
    records: list[dict],
    batch_size: int,
    image: ImageInput,
    *,
    train: bool,
    seed: int = 0,
    num_epochs: int = 1,
) -> Any:
    """Image classification batches: shuffled full batches to train, source order to evaluate."""
    import grain

    if not records:
        raise ValueError("image_batches got no records; the split is empty after filtering.")
    dataset = grain.MapDataset.source(records)
    if train:
        dataset = dataset.shuffle(seed=seed).repeat(num_epochs)
    dataset = dataset.batch(batch_size, drop_remainder=train, batch_fn=list)
    return dataset.map(
        lambda rows: encode_images(rows, batch_size, image.size, image.channels,
                                   image.normalisation)
    )


def image_classification_data(
    name: str,
    model: nnx.Module,
    s: FinetuneSettings,
    train_records: list[dict],
    eval_records: list[dict],
) -> FinetuneData:
    """Shuffled training batches of `train_records` and accuracy on `eval_records`."""
    image = image_input(model, s.image_size, s.normalisation)
    train = image_batches(
        train_records,
        s.train_batch_size,
        image,
        train=True,
        seed=s.seed,
        num_epochs=s.num_epochs,
    )
    batches = _eval_batches(image_batches(eval_records, s.batch_size, image, train=False))
    return FinetuneData(train, evaluators.classification(model, batches, task=name))


def build_cifar(name: str, model: nnx.Module, tokenizer: Any, s: FinetuneSettings) -> FinetuneData:
    """CIFAR-10/100: the first 45,000 train images to train (the paper's split), test accuracy."""
    from es_jax import data

    data_dir = s.data_dir or None
    limit = 45_000 if s.max_train_examples <= 0 else min(s.max_train_examples, 45_000)
    train_records = _first(data.source(name, "train", data_dir), limit)
    eval_records = _first(data.source(name, "test", data_dir), s.max_examples)
    return image_classification_data(name, model, s, train_records, eval_records)


# The image set of each task that reads es_jax.data.images, and a k-NN task's fine-tune twin.
IMAGE_SETS = {"fashion_mnist_few": "fashion_mnist", "digits": "digits"}
KNN_TWIN = {"fashion_knn": "fashion_mnist_few", "digits_knn": "digits"}
KNN_NEIGHBOURS = 20
KNN_TEMPERATURE = 0.07


class ImageSplit(NamedTuple):
    """A task's images as records ({"image": uint8 (H, W, C), "label": int}): train and
    evaluation."""

    train: list[dict]
    evaluation: list[dict]


def image_split(name: str, s: TaskSettings | FinetuneSettings) -> ImageSplit:
    """The images of "fashion_mnist_few" or "digits" for seed `s.seed`.

    fashion_mnist_few: `few_per_class` (s.labels_per_class a class) of Fashion-MNIST train, the
    first s.max_train_examples of them; the first s.max_examples test images (0 = all 10,000).
    digits: the seed's `held_out_split` of the 1,797 images, the first s.max_train_examples of
    its training share and the first s.max_examples of its held-out 20%.
    """
    data_dir = s.data_dir or None
    if name == "fashion_mnist_few":
        train = image_arrays("fashion_mnist", "train", data_dir)
        test = image_arrays("fashion_mnist", "test", data_dir)
        chosen = few_per_class(train.labels, s.labels_per_class, s.seed)
        held = np.arange(len(test.labels))
    else:
        train = test = image_arrays(IMAGE_SETS[name], "train", data_dir)
        chosen, held = held_out_split(len(train.labels), s.seed)
    return ImageSplit(
        _records(train, _limited(list(chosen), s.max_train_examples)),
        _records(test, _limited(list(held), s.max_examples)),
    )


@functools.cache
def image_arrays(name: str, split: str, data_dir: str | None) -> Any:
    """`es_jax.data.images.image_arrays`, read once a process (every seed and k-NN task of a
    sweep reads the same images); the arrays are made read-only."""
    from es_jax.data import images

    image_set = images.image_arrays(name, split, data_dir)
    for array in image_set:
        array.flags.writeable = False
    return image_set


def _records(image_set: Any, indices: list[int]) -> list[dict]:
    """The images and labels at `indices` as records."""
    return [{"image": image_set.images[i], "label": int(image_set.labels[i])} for i in indices]


def few_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Ascending indices of a seeded random `per_class` examples of every class in `labels`;
    ValueError naming a class that has fewer."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(
                f"labels_per_class={per_class}, but class {label} has only {len(members)} "
                "examples; lower labels_per_class."
            )
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def build_image_split(
    name: str, model: nnx.Module, tokenizer: Any, s: FinetuneSettings
) -> FinetuneData:
    """fashion_mnist_few or digits: the seed's training images, accuracy on its evaluation set."""
    split = image_split(name, s)
    return image_classification_data(name, model, s, split.train, split.evaluation)


def build_knn(name: str, model: nnx.Module, s: TaskSettings) -> evaluators.Evaluator:
    """k-NN accuracy (k = 20, or the bank's size when smaller; temperature 0.07) of an image
    backbone's final [CLS] hidden states: the bank is the training images its fine-tune twin
    uses for `s.seed`, the test its evaluation images."""
    twin = KNN_TWIN[name]
    split = image_split(twin, s)
    image = image_input(model, s.image_size, s.normalisation)

    def batches(records: list[dict]) -> list[dict[str, np.ndarray]]:
        return _eval_batches(image_batches(records, s.batch_size, image, train=False))

    return evaluators.knn_classification(
        model,
        batches(split.train),
        batches(split.evaluation),
        num_classes=IMAGE_CLASSES[twin],
        k=min(KNN_NEIGHBOURS, len(split.train)),
        temperature=KNN_TEMPERATURE,
        task=name,
        mesh=s.mesh,
    )


def build_finetune(
    name: str, model: nnx.Module, tokenizer: Any, settings: FinetuneSettings
) -> FinetuneData:
    """Training batches and evaluator of a fine-tune task."""
    task = get(name)
    if task.protocol != "finetune":
        raise ValueError(f"task {name!r} is zero-shot; it has no fine-tuning data.")
    if name.startswith("glue/"):
        return build_glue(name, model, tokenizer, settings)
    if name.startswith("squad"):
        return build_squad(name, model, tokenizer, settings)
    if name in SPLIT_TEXT_TASKS:
        return build_split_text(name, model, tokenizer, settings)
    if name in IMAGE_SETS:
        return build_image_split(name, model, tokenizer, settings)
    return build_cifar(name, model, tokenizer, settings)


def labelled_texts(name: str, data_dir: str | None) -> list[dict]:
    """The records of a small real text-classification set, in file order.

    pang_lee: 200 movie-review sentences, 0 = negative, 1 = positive. text_source: the opening
    `SOURCE_WORDS` words of the first `SOURCE_DOCUMENTS` Wikipedia articles (label 0) and Lee
    background news articles (label 1) with at least that many words, each opening once: which
    corpus a text comes from, a real label of real text.
    """
    from es_jax import data

    if name == "pang_lee":
        texts, labels = data.labelled_sentences("pang_lee", data_dir)
        return [{"text": t, "label": int(y)} for t, y in zip(texts, labels, strict=True)]
    records = []
    for label, corpus in enumerate(("wikipedia", "lee_background")):
        openings = [d.split()[:SOURCE_WORDS] for d in data.documents(corpus, data_dir)]
        openings = [" ".join(words) for words in openings if len(words) == SOURCE_WORDS]
        unique = list(dict.fromkeys(openings))[:SOURCE_DOCUMENTS]
        records += [{"text": t, "label": label} for t in unique]
    return records


def held_out_split(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: a seeded random HELD_OUT share held out (one split a seed:
    repeated random-split cross-validation)."""
    order = np.random.default_rng(seed).permutation(count)
    held = max(1, round(HELD_OUT * count))
    return np.sort(order[held:]), np.sort(order[:held])


def build_split_text(
    name: str, model: nnx.Module, tokenizer: Any, s: FinetuneSettings
) -> FinetuneData:
    """A small real text-classification set: the seed's split, shuffled training batches and
    accuracy on its held-out share."""
    from es_jax.data import tasks as data_tasks

    records = labelled_texts(name, s.data_dir or None)
    train_index, held_index = held_out_split(len(records), s.seed)
    train_records = _limited([records[i] for i in train_index], s.max_train_examples)
    eval_records = _limited([records[i] for i in held_index], s.max_examples)
    spec = data_tasks.ClassificationTask(name, ("text",), 2, "train")
    return classification_data(name, model, tokenizer, s, spec, train_records, eval_records)
