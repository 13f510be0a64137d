"""BERT WordPiece vocabularies trained on a run's corpora, and a light tokenizer over them.

`cached_wordpiece` trains the vocabulary once (on host 0), saves it as a `tokenizers` JSON file and
loads it on every host; a re-run, or a resumed run, reads the saved file. Ids are numbered
canonically, so the same texts always give the same vocabulary. Paths may be `gs://` URLs
(`etils.epath`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
from etils import epath
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import WordPieceTrainer

from es_jax.data.corpora import corpora_documents
from es_jax.mesh import sync_hosts

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def cached_wordpiece(
    path: str | os.PathLike, corpora: Sequence[str], vocab_size: int, data_dir: str | None = None
) -> WordPieceTokenizer:
    """The WordPiece tokenizer saved at `path`, trained on `corpora` (read from the tfds
    `data_dir`, None: the default) first if it is not there."""
    path = epath.Path(path)
    if not path.exists():
        if jax.process_index() == 0:
            partial_path = path.with_suffix(".partial")
            train_wordpiece(list(corpora_documents(corpora, data_dir)), vocab_size, partial_path)
            partial_path.rename(path)  # atomic: a kill never leaves a half-written vocabulary
        sync_hosts("tokenizer")
    return WordPieceTokenizer(path)


def train_wordpiece(texts: list[str], vocab_size: int, path: str | os.PathLike) -> Tokenizer:
    """A lower-cased BERT WordPiece tokenizer trained on `texts`, saved to `path`."""
    trained = bert_tokenizer(models.WordPiece(unk_token="[UNK]"))
    trainer = WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, *continuing_pieces(trained, texts)]
    )
    trained.train_from_iterator(texts, trainer=trainer)
    tokenizer = bert_tokenizer(models.WordPiece(canonical_vocab(trained), unk_token="[UNK]"))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tokenizer.to_str(pretty=True))
    return tokenizer


def bert_tokenizer(model: models.WordPiece) -> Tokenizer:
    """A tokenizer over `model` with BERT's lower-casing normalizer, pre-tokenizer and decoder."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def continuing_pieces(tokenizer: Tokenizer, texts: list[str]) -> list[str]:
    """Every continuing-subword piece (`##c`) the trainer would start from, sorted."""
    # The trainer creates these pieces as it walks a hash map of words, so their ids, which break
    # ties between equally frequent merges, vary between processes (huggingface/tokenizers#1794).
    # Given to it up front, in sorted order, they have the same ids in every process.
    chars = set()
    for text in texts:
        normalized = tokenizer.normalizer.normalize_str(text)
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized):
            chars.update(word[1:])
    return [f"##{c}" for c in sorted(chars)]


def canonical_vocab(tokenizer: Tokenizer) -> dict[str, int]:
    """The trained pieces numbered canonically: the special tokens, then the rest sorted."""
    # Numbered canonically, not in the trainer's order of merges, the same pieces always get the
    # same ids (runs on several data volumes share a vocabulary).
    pieces = sorted(set(tokenizer.get_vocab()) - set(SPECIAL_TOKENS))
    return {piece: i for i, piece in enumerate([*SPECIAL_TOKENS, *pieces])}


class WordPieceTokenizer:
    """The few tokenizer attributes the pipelines use, over a `tokenizers.Tokenizer`.

    Loading through transformers costs seconds of imports in every process; this keeps a run's
    start (and a resumed run's restart) short.
    """

    def __init__(self, path: str | os.PathLike):
        self.backend = Tokenizer.from_str(epath.Path(path).read_text())
        for kind in ("pad", "unk", "cls", "sep", "mask"):
            setattr(self, f"{kind}_token_id", self.backend.token_to_id(f"[{kind.upper()}]"))
        self.eos_token_id = None
        self.all_special_ids = [self.backend.token_to_id(t) for t in SPECIAL_TOKENS]

    def __len__(self) -> int:
        return self.backend.get_vocab_size()

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list]:
        """Token ids of each text, as transformers' tokenizers return them."""
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}
