"""Multiple-choice question sets: MMLU-format folders (flat or test/ dev/), tfds datasets (a tiny
local builder and mock data), the bundled "facts" set, and clear errors for malformed input."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from es_jax import data
from es_jax.data import multiple_choice
from es_jax.data.multiple_choice import Question

ALGEBRA_TEST = 'What is 2 + 2?,3,4,5,6,B\n"Solve x, if x + 1 = 3.",1,2,3,4,b\n'
ASTRONOMY_TEST = (
    "Which planet is largest?,Mars,Earth,Jupiter,Venus,C\n\n"  # a blank line is skipped
    "Which star is nearest?,Sun,Vega,Sirius,Rigel,A\n"
)
ASTRONOMY_DEV = "Which planet has rings that are easy to see?,Saturn,Mercury,Mars,Venus,A\n"
EXPECTED_TEST = [
    Question("algebra", "What is 2 + 2?", ("3", "4", "5", "6"), 1),
    Question("algebra", "Solve x, if x + 1 = 3.", ("1", "2", "3", "4"), 1),
    Question("astronomy", "Which planet is largest?", ("Mars", "Earth", "Jupiter", "Venus"), 2),
    Question("astronomy", "Which star is nearest?", ("Sun", "Vega", "Sirius", "Rigel"), 0),
]


def write_mmlu(folder, subfolders: bool):
    """A small MMLU-format folder: two subjects, dev questions for one of them."""
    files = {
        "algebra_test.csv": ALGEBRA_TEST,
        "astronomy_test.csv": ASTRONOMY_TEST,
        "astronomy_dev.csv": ASTRONOMY_DEV,
    }
    for name, text in files.items():
        split = name.removesuffix(".csv").rsplit("_", 1)[1]
        path = folder / split / name if subfolders else folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("subfolders", [False, True])
def test_an_mmlu_folder_reads_subjects_in_name_order_and_rows_in_file_order(tmp_path, subfolders):
    folder = write_mmlu(tmp_path, subfolders)
    assert data.question_set(str(folder)) == EXPECTED_TEST
    assert data.question_set(str(folder), "dev") == [
        Question(
            "astronomy",
            "Which planet has rings that are easy to see?",
            ("Saturn", "Mercury", "Mars", "Venus"),
            0,
        )
    ]


def test_a_folder_without_dev_files_has_an_empty_dev_split(tmp_path):
    (tmp_path / "algebra_test.csv").write_text(ALGEBRA_TEST)
    assert data.question_set(str(tmp_path), "dev") == []


def test_rows_may_hold_any_number_of_choices_and_utf8_text(tmp_path):
    (tmp_path / "mixed_test.csv").write_text("Où est Brasília ?,Brésil,Pérou,A\nQ,a,b,c,d,e,E\n")
    assert data.question_set(str(tmp_path)) == [
        Question("mixed", "Où est Brasília ?", ("Brésil", "Pérou"), 0),
        Question("mixed", "Q", ("a", "b", "c", "d", "e"), 4),
    ]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("Q,a,b,c,d,A\nQ2,a,b\n", 2, r"expected 'question,A,B,C,D,answer'.*found 3 fields"),
        ("Q,a,b,c,d,A\nQ2,a,b,c,d,E\n", 2, r"the answer 'E' is not one of the letters A, B, C, D"),
        ("Q,a,b,c,d,\n", 1, r"the answer '' is not one of"),
        ("Q,a,b,c,d,AB\n", 1, r"the answer 'AB' is not one of"),
        ("question,A,B,C,D,answer\n", 1, r"the answer 'answer' is not one of .*have no header row"),
        ('"Q\nover two lines",a,b,c,d,A\nQ2,a,b,c,d,Z\n', 3, r"the answer 'Z'"),
    ],
)
def test_a_malformed_row_is_refused_naming_the_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "broken_test.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{path}:{line}: {message}"):
        data.question_set(str(tmp_path))


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin_test.csv"
    path.write_bytes("Où?,a,b,c,d,A\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{path} is not UTF-8 text"):
        data.question_set(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing", r"question folder .*missing does not exist or is not a folder"),
        ("algebra_test.csv", r"algebra_test\.csv does not exist or is not a folder"),
        ("empty", r"holds no <subject>_test\.csv files .*is it MMLU's data folder"),
    ],
)
def test_a_missing_or_empty_folder_is_refused(tmp_path, name, message):
    (tmp_path / "algebra_test.csv").write_text(ALGEBRA_TEST)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=message):
        data.question_set(str(tmp_path / name))


def test_a_subject_in_both_layouts_is_refused(tmp_path):
    write_mmlu(tmp_path, subfolders=True)
    (tmp_path / "algebra_test.csv").write_text(ALGEBRA_TEST)
    with pytest.raises(ValueError, match=r"subject 'algebra' has two test files"):
        data.question_set(str(tmp_path))


def test_an_empty_test_split_is_refused(tmp_path):
    (tmp_path / "algebra_test.csv").write_text("\n\n")
    with pytest.raises(ValueError, match=r"has no test questions"):
        data.question_set(str(tmp_path))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("facts", "validation"), r"split must be one of \('test', 'dev'\)"),
        (("",), "no question set given"),
    ],
)
def test_a_bad_split_or_empty_name_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        data.question_set(*args)


# ----------------------------------------------------------------------------------------------
# tfds datasets.

TOY_RECORDS = {
    "test": [
        ("geology", "Which rock is igneous?", ["Granite", "Shale", "Marble"], 0),
        ("geology", "Which mineral is hardest?", ["Talc", "Quartz", "Diamond", "Gypsum"], 2),
    ],
    "dev": [("geology", "Which rock is made of sand?", ["Sandstone", "Basalt"], 0)],
}


class EsJaxMultipleChoiceToy(tfds.core.GeneratorBasedBuilder):
    """A tfds dataset shaped like Hugging Face's MMLU: test and dev splits, no download."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "subject": tfds.features.Text(),
                "question": tfds.features.Text(),
                "choices": tfds.features.Sequence(tfds.features.Text()),
                "answer": np.int64,
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in TOY_RECORDS}

    def _generate_examples(self, split):
        for i, (subject, question, choices, answer) in enumerate(TOY_RECORDS[split]):
            record = {"subject": subject, "question": question, "choices": choices}
            yield i, {**record, "answer": answer}


class EsJaxMultipleChoiceMock(tfds.core.GeneratorBasedBuilder):
    """Features only (four choices, a class label answer, no subject), for tfds mock data."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "question": tfds.features.Text(),
                "choices": tfds.features.Sequence(tfds.features.Text(), length=4),
                "answer": tfds.features.ClassLabel(num_classes=4),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        yield from ()


@pytest.fixture
def online(monkeypatch):
    """Downloads allowed (the toy dataset downloads nothing, but preparing counts as one)."""
    for env in data.sources.OFFLINE_ENVS:
        monkeypatch.delenv(env, raising=False)


@pytest.mark.parametrize("split", ["test", "dev"])
def test_a_tfds_dataset_reads_question_choices_answer_and_subject(tmp_path, online, split):
    found = data.question_set("tfds:es_jax_multiple_choice_toy", split, tmp_path)
    expected = [Question(s, q, tuple(c), a) for s, q, c, a in TOY_RECORDS[split]]
    assert sorted(found) == sorted(expected)
    assert all(isinstance(text, str) for q in found for text in (q.subject, q.question, *q.choices))


def test_tfds_mock_data_without_subjects_reads_through(tmp_path):
    with tfds.testing.mock_data(num_examples=5):
        found = data.question_set("tfds:es_jax_multiple_choice_mock", "test", tmp_path)
    assert len(found) == 5
    for question in found:
        assert question.subject == ""
        assert len(question.choices) == 4
        assert 0 <= question.answer < 4


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"question": "Q", "choices": ["a", "b"]}, r"lacks the fields \['answer'\]"),
        ({"question": "Q", "choices": ["a", "b"], "answer": 2}, r"answer 2 is not the index"),
        ({"question": "Q", "choices": ["a", "b"], "answer": -1}, r"answer -1 is not the index"),
        ({"question": "Q", "choices": ["a"], "answer": 0}, r"at least two choices"),
    ],
)
def test_a_malformed_tfds_record_is_refused_naming_it(record, message):
    with pytest.raises(ValueError, match=rf"^tfds:x \(test record 3\): .*{message}"):
        multiple_choice.record_question(record, "tfds:x (test record 3)")


def test_tfds_bytes_and_numpy_values_are_decoded():
    record = {
        "question": b"Q?",
        "choices": np.array([b"yes", b"no"], dtype=object),
        "answer": np.int64(1),
        "subject": b"logic",
    }
    assert multiple_choice.record_question(record, "r") == Question("logic", "Q?", ("yes", "no"), 1)


# ----------------------------------------------------------------------------------------------
# The bundled set.


def test_the_bundled_facts_set_is_well_formed():
    test, dev = data.question_set("facts"), data.question_set("facts", "dev")
    assert (len(test), len(dev)) == (75, 25)
    subjects = ["arithmetic", "biology", "chemistry", "geography", "history"]
    assert sorted({q.subject for q in test}) == sorted({q.subject for q in dev}) == subjects
    assert all(sum(q.subject == s for q in dev) == 5 for s in subjects)  # enough for 5 shots
    texts = [q.question for q in test + dev]
    assert len(set(texts)) == len(texts)
    for question in test + dev:
        assert len(question.choices) == 4
        assert len(set(question.choices)) == 4
        assert 0 <= question.answer < 4
        assert question.question.strip()
        assert all(choice.strip() for choice in question.choices)
    # the right answer is spread over the letters, so always guessing one letter scores ~25%
    counts = np.bincount([q.answer for q in test], minlength=4)
    assert counts.min() >= 15


def test_the_bundled_set_is_a_folder_in_the_package_and_unknown_names_are_refused():
    folder = multiple_choice.bundled_folder("facts")
    assert folder.is_dir()
    assert {p.name for p in folder.glob("*_test.csv")} == {
        f"{s}_test.csv" for s in ("arithmetic", "biology", "chemistry", "geography", "history")
    }
    with pytest.raises(ValueError, match=r"unknown bundled question set 'mmlu'"):
        multiple_choice.bundled_folder("mmlu")
