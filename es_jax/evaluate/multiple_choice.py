"""Zero-shot multiple-choice accuracy (MMLU) from the log-likelihood of each choice.

Each question becomes a prompt: MMLU's header naming its subject, `shots` solved examples of the
same subject (the first ones of the dev split), then the question, its lettered choices and
"Answer:". Each choice is a continuation: " A", " B", ... (style "letter", as MMLU's harness
scores it) or " " + the choice's text (style "text"); solved examples end with the right answer's
continuation. A choice's score is the summed log-probability of its continuation's tokens given the
prompt, read from one causal-LM forward over prompt + continuation; the prediction is the
highest-scoring choice (the first on ties; a non-finite score never wins). Accuracy is in points
(x 100), as every accuracy here, so the sweep's epsilon of 1 point applies to it; style "text"
also reports `acc_norm`, the accuracy of the scores divided by each continuation's length in
UTF-8 bytes.

Prompt and continuation are tokenised separately and their ids concatenated, so the continuation's
tokens are exactly known. Each row (one per question and choice) starts with the tokenizer's own
leading special tokens (BOS, [CLS]; none for most byte-level BPE tokenizers); a prompt too long for
`max_length` loses its first tokens after those. Rows are right-padded to one length, the longest
row rounded up to a multiple of 8 (at most `max_length`), and batched `batch_size` rows at a time,
so the jitted forward compiles once for every parameter set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx

from es_jax.data.multiple_choice import LETTERS, Question
from es_jax.evaluate import evaluators, metrics

STYLES = ("letter", "text")
LENGTH_MULTIPLE = 8  # rows are padded to a multiple of this many tokens
BATCH_KEYS = ("input_ids", "attention_mask", "continuation_mask")
_PROBE = "Answer:"  # a text whose encoding shows the tokenizer's leading special tokens


def check_style(style: str) -> str:
    """The style if it is "letter" or "text"; ValueError otherwise."""
    if style not in STYLES:
        raise ValueError(f"multiple-choice style must be one of {STYLES}, not {style!r}.")
    return style


def subject_header(subject: str) -> str:
    """MMLU's first paragraph, naming the subject (underscores as spaces) when there is one."""
    about = f" about {subject.replace('_', ' ')}" if subject else ""
    return f"The following are multiple choice questions (with answers){about}.\n\n"


def continuations(question: Question, style: str) -> list[str]:
    """The text each choice continues the prompt with: " A", " B", ... or " " + its text."""
    if check_style(style) == "letter":
        return [f" {LETTERS[i]}" for i in range(len(question.choices))]
    return [f" {choice}" for choice in question.choices]


def format_question(question: Question, style: str, solved: bool = False) -> str:
    """The question, its lettered choices and "Answer:"; a solved one adds its answer and a
    blank line."""
    lettered = [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices)]
    text = "\n".join([question.question, *lettered, "Answer:"])
    if solved:
        return f"{text}{continuations(question, style)[question.answer]}\n\n"
    return text


def prompt(question: Question, shots: Sequence[Question], style: str) -> str:
    """The subject header, the solved examples, then the question up to "Answer:"."""
    examples = "".join(format_question(shot, style, solved=True) for shot in shots)
    return subject_header(question.subject) + examples + format_question(question, style)


def few_shot_examples(
    questions: Sequence[Question], dev: Sequence[Question], shots: int
) -> dict[str, list[Question]]:
    """{subject: its first `shots` dev questions} for every subject of `questions`."""
    if shots < 0:
        raise ValueError(f"shots must be >= 0 solved examples, got {shots}.")
    examples: dict[str, list[Question]] = {q.subject: [] for q in questions}
    for example in dev:
        found = examples.get(example.subject)
        if found is not None and len(found) < shots:
            found.append(example)
    short = {subject: len(found) for subject, found in examples.items() if len(found) < shots}
    if short:
        raise ValueError(
            f"{shots}-shot prompts need {shots} dev questions per subject, but subjects "
            f"{dict(list(short.items())[:5])} have fewer; add <subject>_dev.csv files (or a dev "
            "split) or use fewer shots."
        )
    return examples


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before any text (BOS, [CLS]), read from encoding a probe."""
    plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(_PROBE)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def choice_row(
    prefix: list[int],
    prompt_ids: list[int],
    continuation_ids: list[int],
    max_length: int,
    where: str = "a choice",
) -> tuple[list[int], int]:
    """(prefix + prompt + continuation ids, where the continuation starts), the prompt cut from
    its left to fit `max_length`; `where` names the choice in errors."""
    room = max_length - len(prefix) - len(continuation_ids)
    if room < 1 or not continuation_ids:
        raise ValueError(
            f"{where}: a continuation of {len(continuation_ids)} tokens after {len(prefix)} "
            f"leading special tokens leaves {room} of max_length={max_length} tokens for the "
            "prompt; raise max_length (a continuation needs at least one token and one prompt "
            "token)."
        )
    kept = prompt_ids[max(0, len(prompt_ids) - room) :]
    return [*prefix, *kept, *continuation_ids], len(prefix) + len(kept)


@dataclass(frozen=True)
class ChoiceRows:
    """The token rows of every (question, choice), question by question, choice by choice."""

    ids: list[np.ndarray]  # int32 token ids of each row
    starts: list[int]  # the index of each row's first continuation token
    counts: list[int]  # choices per question
    continuation_bytes: np.ndarray  # UTF-8 length of each row's continuation text


def choice_rows(
    questions: Sequence[Question],
    examples: dict[str, list[Question]],
    tokenizer: Any,
    style: str,
    max_length: int,
) -> ChoiceRows:
    """Tokenises each prompt and each distinct continuation once and joins them into rows."""
    prompts = [prompt(q, examples.get(q.subject, []), style) for q in questions]
    texts = [continuations(q, style) for q in questions]
    distinct = sorted({text for choices in texts for text in choices})
    encoded = tokenizer(distinct, add_special_tokens=False)["input_ids"]
    continuation_ids = dict(zip(distinct, encoded, strict=True))
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    prefix = leading_special_ids(tokenizer)
    ids, starts = [], []
    for index, (ids_of_prompt, choices) in enumerate(zip(prompt_ids, texts, strict=True)):
        ids_of_prompt = list(ids_of_prompt)
        for letter, text in zip(LETTERS, choices, strict=False):
            where = f"question {index} ({questions[index].question[:40]!r}), choice {letter}"
            row, start = choice_row(
                prefix, ids_of_prompt, list(continuation_ids[text]), max_length, where
            )
            ids.append(np.asarray(row, np.int32))
            starts.append(start)
    sizes = np.array([len(text.encode("utf-8")) for choices in texts for text in choices])
    return ChoiceRows(ids, starts, [len(choices) for choices in texts], sizes)


def row_length(rows: ChoiceRows, max_length: int) -> int:
    """The padded length of every row: the longest, rounded up to LENGTH_MULTIPLE, capped."""
    longest = max(len(row) for row in rows.ids)
    return min(max_length, -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE)


def choice_batches(
    rows: ChoiceRows, length: int, batch_size: int, pad_id: int
) -> list[evaluators.Batch]:
    """Right-padded fixed-shape batches of the rows with a `continuation_mask` (1 on each
    continuation token) and `weights` (0 on padding rows of the last batch)."""
    batches = []
    for first in range(0, len(rows.ids), batch_size):
        chunk = range(first, min(first + batch_size, len(rows.ids)))
        input_ids = np.full((batch_size, length), pad_id, np.int32)
        attention = np.zeros((batch_size, length), np.int32)
        continuation = np.zeros((batch_size, length), np.float32)
        for slot, row in enumerate(chunk):
            tokens = rows.ids[row]
            input_ids[slot, : len(tokens)] = tokens
            attention[slot, : len(tokens)] = 1
            continuation[slot, rows.starts[row] : len(tokens)] = 1.0
        weights = (np.arange(batch_size) < len(chunk)).astype(np.float32)
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": attention,
                "continuation_mask": continuation,
                "weights": weights,
            }
        )
    return batches


def continuation_log_likelihoods(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
    """Per row (B,): the summed log-probability of its continuation tokens given what precedes
    them (fp32)."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    picked = evaluators.token_log_probs(logits[:, :-1], batch["input_ids"][:, 1:])
    return (picked * batch["continuation_mask"][:, 1:]).sum(axis=-1)


def choice_accuracy_x100(scores: Sequence[np.ndarray], answers: np.ndarray) -> float:
    """Percentage of questions whose highest-scoring choice (first on ties) is the answer; a
    non-finite score ranks below every finite one."""
    predicted = [int(np.argmax(np.where(np.isfinite(s), s, -np.inf))) for s in scores]
    return metrics.accuracy_x100(np.array(predicted), answers)


@dataclass
class MultipleChoiceEvaluator(evaluators.Evaluator):
    """Accuracy (x 100) on multiple-choice questions; `report` adds acc_norm for style "text"."""

    style: str
    log_likelihoods: Callable[[Any], list[np.ndarray]]  # params -> per question, per choice
    answers: np.ndarray
    continuation_bytes: list[np.ndarray]  # per question, per choice

    def report(self, params: Any) -> dict[str, float]:
        """{"acc": ...} for style "letter"; {"acc": ..., "acc_norm": ...} for style "text"."""
        scores = self.log_likelihoods(params)
        result = {"acc": choice_accuracy_x100(scores, self.answers)}
        if self.style == "text":
            normalised = [s / n for s, n in zip(scores, self.continuation_bytes, strict=True)]
            result["acc_norm"] = choice_accuracy_x100(normalised, self.answers)
        return result


def multiple_choice(
    model: nnx.Module,
    tokenizer: Any,
    questions: Sequence[Question],
    dev: Sequence[Question] = (),
    *,
    shots: int = 0,
    style: str = "letter",
    max_length: int = 256,
    batch_size: int = 16,
    task: str = "mmlu",
) -> MultipleChoiceEvaluator:
    """The accuracy evaluator of a causal LM on these questions (`shots` examples from `dev`)."""
    check_style(style)
    if not questions:
        raise ValueError(f"task {task!r}: no questions to evaluate; check the question set.")
    if max_length <= 0 or batch_size <= 0:
        raise ValueError(
            f"task {task!r}: max_length and batch_size must be positive, got {max_length} and "
            f"{batch_size}."
        )
    examples = few_shot_examples(questions, dev, shots)
    rows = choice_rows(questions, examples, tokenizer, style, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = choice_batches(rows, row_length(rows, max_length), batch_size, pad_id)
    forward = evaluators.make_forward(model, continuation_log_likelihoods)
    on_device = evaluators.device_batches(batches, BATCH_KEYS)
    bounds = np.cumsum(rows.counts)[:-1]
    answers = np.array([q.answer for q in questions])

    def log_likelihoods(params: Any) -> list[np.ndarray]:
        values = [
            np.asarray(forward(params, batch))[b["weights"] > 0]
            for batch, b in zip(on_device, batches, strict=True)
        ]
        return np.split(np.concatenate(values).astype(np.float64), bounds)

    def score(params: Any) -> float:
        return choice_accuracy_x100(log_likelihoods(params), answers)

    return MultipleChoiceEvaluator(
        task,
        "accuracy",
        True,
        score,
        (forward,),
        len(questions),
        style,
        log_likelihoods,
        answers,
        np.split(rows.continuation_bytes, bounds),
    )
