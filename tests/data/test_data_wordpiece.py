"""WordPiece vocabularies: reproducible training, the light tokenizer, the copy cached on disk."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from es_jax.data import wordpiece

# Trains lee_background vocabularies of several sizes into the directory given, in a fresh process.
TRAIN = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from es_jax.data import documents, train_wordpiece

    texts = documents("lee_background")
    for size in (300, 500, 3000):
        train_wordpiece(texts, size, Path(sys.argv[1]) / f"{size}.json")
    """
)


def test_wordpiece_vocabulary_is_reproducible(tmp_path):
    texts = ["the cat sat on the mat", "a dog ran in the park", "cats and dogs"] * 20
    first = wordpiece.train_wordpiece(texts, 60, tmp_path / "a.json")
    wordpiece.train_wordpiece(texts, 60, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    tokenizer = wordpiece.WordPieceTokenizer(tmp_path / "a.json")
    ids = tokenizer(["the cat"])["input_ids"][0]
    assert ids[0] == tokenizer.cls_token_id
    assert ids[-1] == tokenizer.sep_token_id
    assert [first.id_to_token(i) for i in range(5)] == list(wordpiece.SPECIAL_TOKENS)


def test_cached_vocabulary_is_trained_on_the_corpora_once_then_read(tmp_path):
    path = tmp_path / "run" / "tokenizer.json"
    tokenizer = wordpiece.cached_wordpiece(path, ["lee_background"], 300)
    assert list(path.parent.iterdir()) == [path]  # no partial file left behind
    assert len(tokenizer) <= 300
    the = tokenizer.backend.token_to_id("the")  # the corpus's commonest word is one piece
    ids = tokenizer(["The"])["input_ids"][0]
    assert ids == [tokenizer.cls_token_id, the, tokenizer.sep_token_id]
    saved = path.read_text()
    again = wordpiece.cached_wordpiece(path, ["lee_background"], 100)  # read, not retrained
    assert path.read_text() == saved
    assert len(again) == len(tokenizer) > 100


def train_in_processes(directories: list[Path]) -> None:
    """Runs `TRAIN` into each directory, each in its own fresh interpreter, all at once."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", TRAIN, str(d)], cwd=Path(__file__).parents[2], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for d in directories
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]


def test_vocabulary_is_identical_across_processes(tmp_path):
    # The trainer's hash maps are seeded per process; tokenizers#1794 made the vocabulary vary.
    directories = [tmp_path / str(i) for i in range(3)]
    train_in_processes(directories)
    for size in (300, 500, 3000):
        first, *others = [(d / f"{size}.json").read_bytes() for d in directories]
        assert all(other == first for other in others), f"vocabularies of {size} differ"
