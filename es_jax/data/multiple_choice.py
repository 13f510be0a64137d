"""Multiple-choice question sets in MMLU's format: a local folder, a tfds dataset, or a bundled set.

`question_set(data, split)` reads one split ("test" to evaluate, "dev" for solved examples) of:
  - a folder laid out as MMLU's data: CSV files without a header, rows `question,A,B,C,D,answer`
    (the answer a letter), named `<subject>_test.csv` and `<subject>_dev.csv`, either in the folder
    itself or in its `test/` and `dev/` subfolders (as in MMLU's tarball); subjects in name order,
    rows in file order;
  - `tfds:NAME`, a tfds dataset (array_record, read through `es_jax.data.sources.source`) whose
    records hold `question`, `choices` (a sequence of strings), `answer` (the right choice's
    index) and optionally `subject`; records in the data source's order;
  - a bundled set by name: "facts" (100 four-choice questions on public-domain facts: 15 test
    and 5 dev questions in each of arithmetic, biology, chemistry, geography and history), which
    stands in for MMLU offline.
Each question comes back as a `Question(subject, question, choices, answer)`.
"""

import csv
import importlib.resources
import os
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from es_jax.data.sources import source

LETTERS = string.ascii_uppercase
SPLITS = ("test", "dev")
TFDS_PREFIX = "tfds:"
BUNDLED_SETS = ("facts",)
_BUNDLED_FOLDER = "question_sets"  # below this package: one folder per bundled set


class Question(NamedTuple):
    """One multiple-choice question: its subject, text, choices and the right choice's index."""

    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int


def question_set(
    data: str, split: str = "test", data_dir: str | os.PathLike | None = None
) -> list[Question]:
    """The questions of one split ("test" or "dev") of a folder, `tfds:NAME` or bundled set.

    `data_dir` is the tfds data dir of a `tfds:` set (unused otherwise). A folder without dev
    files has an empty dev split; a test split must hold at least one question.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}.")
    if not data:
        raise ValueError(
            f"no question set given; name a folder in MMLU's layout, {TFDS_PREFIX}NAME or a "
            f"bundled set {BUNDLED_SETS}."
        )
    if data.startswith(TFDS_PREFIX):
        found = tfds_questions(data.removeprefix(TFDS_PREFIX), split, data_dir)
    elif data in BUNDLED_SETS:
        found = folder_questions(bundled_folder(data), split)
    else:
        found = folder_questions(Path(data).expanduser(), split)
    if split == "test" and not found:
        raise ValueError(f"question set {data!r} has no test questions.")
    return found


def bundled_folder(name: str) -> Path:
    """The folder of a bundled question set ("facts")."""
    if name not in BUNDLED_SETS:
        raise ValueError(f"unknown bundled question set {name!r}; bundled: {BUNDLED_SETS}.")
    root = importlib.resources.files("es_jax.data").joinpath(_BUNDLED_FOLDER, name)
    return Path(str(root))


def subject_files(folder: Path, split: str) -> dict[str, Path]:
    """{subject: file} of the `<subject>_<split>.csv` files in `folder` and `folder/<split>`."""
    if not folder.is_dir():
        raise ValueError(
            f"question folder {folder} does not exist or is not a folder; give a folder in "
            f"MMLU's layout (<subject>_test.csv files), {TFDS_PREFIX}NAME or a bundled set "
            f"{BUNDLED_SETS}."
        )
    suffix = f"_{split}.csv"
    files: dict[str, Path] = {}
    for directory in (folder, folder / split):
        for path in sorted(directory.glob(f"*{suffix}")):
            subject = path.name.removesuffix(suffix)
            if subject in files:
                raise ValueError(
                    f"subject {subject!r} has two {split} files, {files[subject]} and {path}; "
                    "keep one of them."
                )
            files[subject] = path
    if split == "test" and not files:
        raise ValueError(
            f"question folder {folder} holds no <subject>_test.csv files (looked in it and in "
            f"{folder / 'test'}); is it MMLU's data folder?"
        )
    return dict(sorted(files.items()))


def folder_questions(folder: Path, split: str) -> list[Question]:
    """Every question of one split of a folder in MMLU's layout, subjects in name order."""
    return [
        question
        for subject, path in subject_files(folder, split).items()
        for question in csv_questions(path, subject)
    ]


def csv_questions(path: Path, subject: str) -> list[Question]:
    """The rows `question,choice,...,answer letter` of one headerless CSV file, in order."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.reader(file)
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason}); save it as UTF-8.") from None
    except csv.Error as error:
        raise ValueError(f"{path} is not a readable CSV file ({error}).") from None
    return [csv_question(row, subject, f"{path}:{line}") for line, row in rows if row]


def csv_question(row: Sequence[str], subject: str, where: str) -> Question:
    """One CSV row as a Question; `where` (file:line) names it in errors."""
    if len(row) < 4:
        raise ValueError(
            f"{where}: expected 'question,A,B,C,D,answer' (at least two choices), found "
            f"{len(row)} fields: {list(row)[:3]}."
        )
    *texts, letter = row
    question, choices = texts[0], tuple(texts[1:])
    letters = LETTERS[: len(choices)]
    if len(letter.strip()) != 1 or letter.strip().upper() not in letters:
        hint = " (MMLU's files have no header row)" if where.endswith(":1") else ""
        raise ValueError(
            f"{where}: the answer {letter!r} is not one of the letters {', '.join(letters)} of "
            f"its {len(choices)} choices{hint}."
        )
    return Question(subject, question, choices, letters.index(letter.strip().upper()))


def tfds_questions(
    name: str, split: str, data_dir: str | os.PathLike | None = None
) -> list[Question]:
    """The questions of one split of a tfds dataset, in the data source's order."""
    records = source(name, split, data_dir)
    return [
        record_question(records[i], f"{TFDS_PREFIX}{name} ({split} record {i})")
        for i in range(len(records))
    ]


def record_question(record: dict[str, Any], where: str) -> Question:
    """A tfds record (`question`, `choices`, `answer`, optional `subject`) as a Question."""
    missing = [field for field in ("question", "choices", "answer") if field not in record]
    if missing:
        raise ValueError(
            f"{where}: lacks the fields {missing}; a multiple-choice record holds question, "
            f"choices, answer (and optionally subject), this one {sorted(record)}."
        )
    choices = tuple(_text(choice) for choice in record["choices"])
    answer = int(record["answer"])
    if len(choices) < 2 or not 0 <= answer < len(choices):
        raise ValueError(
            f"{where}: answer {answer} is not the index of one of its {len(choices)} choices "
            "(need at least two choices and 0 <= answer < choices)."
        )
    subject = _text(record["subject"]) if "subject" in record else ""
    return Question(subject, _text(record["question"]), choices, answer)


def _text(value: str | bytes) -> str:
    """A tfds Text feature as `str` (data sources may hand back bytes)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
