"""The tasks a sweep can evaluate, by name: what metric, what kind of model, how to build it.

A task turns (model, tokenizer, settings) into an `Evaluator` whose batches are tokenised once.
Zero-shot tasks run on the pre-trained model as it is (embedding similarity on an encoder,
perplexity on a causal LM, MLM loss on a masked LM); fine-tune tasks (GLUE, SQuAD, CIFAR) need a
fresh head and masked fine-tuning first, which the sweep does before calling the evaluator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flax import nnx

from es_jax.evaluate import evaluators

# The kinds of model a task needs; the sweep checks them against the model before any work.
ENCODER = "encoder"  # a base encoder returning hidden states (B, L, H)
CAUSAL_LM = "causal_lm"
MASKED_LM = "mlm"
CLASSIFIER = "classification"
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
        Task("glue/mnli", "accuracy", True, CLASSIFIER, "finetune", "MNLI matched accuracy"),
        Task("glue/qnli", "accuracy", True, CLASSIFIER, "finetune", "QNLI accuracy"),
        Task("glue/qqp", "accuracy", True, CLASSIFIER, "finetune", "QQP accuracy"),
        Task("glue/sst2", "accuracy", True, CLASSIFIER, "finetune", "SST-2 accuracy"),
        Task("glue/rte", "accuracy", True, CLASSIFIER, "finetune", "RTE accuracy"),
        Task("squad/v1.1", "f1", True, QUESTION_ANSWERING, "finetune", "SQuAD v1.1 F1"),
        Task("cifar10", "accuracy", True, CLASSIFIER, "finetune", "CIFAR-10 top-1 accuracy"),
        Task("cifar100", "accuracy", True, CLASSIFIER, "finetune", "CIFAR-100 top-1 accuracy"),
    )
}


def get(name: str) -> Task:
    """The task of this name; ValueError listing the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks are {sorted(TASKS)}.")
    return TASKS[name]


def _limited(items: list, max_examples: int) -> list:
    """The first `max_examples` items (all of them when max_examples <= 0)."""
    return items if max_examples <= 0 else items[:max_examples]


def text_batches(
    texts: list[str], tokenizer: Any, max_length: int, batch_size: int
) -> list[dict[str, np.ndarray]]:
    """Fixed-shape padded batches of texts in order, with a `weights` row mask."""
    from es_jax import data

    return list(data.padded_batches(texts, tokenizer, max_length, batch_size))


def build_lee(model: nnx.Module, tokenizer: Any, settings: TaskSettings) -> evaluators.Evaluator:
    """Lee: embeddings of the 50 documents, cosine vs the human matrix (1,225 pairs)."""
    from es_jax import data

    documents, human = data.lee_similarity(settings.data_dir or None)
    n = len(_limited(documents, settings.max_examples))
    batches = text_batches(documents[:n], tokenizer, settings.max_length, settings.batch_size)
    return evaluators.document_similarity(model, batches, human[:n, :n], task="lee")


def build_word_pairs(
    name: str, model: nnx.Module, tokenizer: Any, settings: TaskSettings
) -> evaluators.Evaluator:
    """WordSim-353 / SimLex-999: embeddings of each word alone, cosine per pair."""
    from es_jax import data

    pairs, human = data.word_pairs(name, settings.data_dir or None)
    pairs = _limited(pairs, settings.max_examples)
    human = human[: len(pairs)]
    words = sorted({word for pair in pairs for word in pair})
    batches = text_batches(words, tokenizer, settings.word_max_length, settings.batch_size)
    return evaluators.word_pair_similarity(model, batches, words, pairs, human, task=name)


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
        return evaluators.perplexity(model, batches, task="wikitext")
    return evaluators.lm_loss(model, batches, task="wikitext_loss")


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
    return evaluators.mlm_loss(model, batches, task="wikitext_mlm")


ZERO_SHOT_BUILDERS: dict[str, Callable[[nnx.Module, Any, TaskSettings], evaluators.Evaluator]] = {
    "lee": build_lee,
    "wordsim353": lambda m, t, s: build_word_pairs("wordsim353", m, t, s),
    "simlex999": lambda m, t, s: build_word_pairs("simlex999", m, t, s),
    "wikitext": lambda m, t, s: build_wikitext("perplexity", m, t, s),
    "wikitext_loss": lambda m, t, s: build_wikitext("lm_loss", m, t, s),
    "wikitext_mlm": build_wikitext_mlm,
}


def build_zero_shot(
    name: str, model: nnx.Module, tokenizer: Any, settings: TaskSettings
) -> evaluators.Evaluator:
    """The evaluator of a zero-shot task on this model."""
    return ZERO_SHOT_BUILDERS[get(name).name](model, tokenizer, settings)
