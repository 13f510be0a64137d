"""grain pipelines: padded evaluation batches, packed LM/MLM token blocks, document subsets.

Every pipeline is a pure function of its arguments (texts, tokenizer, sizes, seed, shard): the
same call gives the same batches in the same order. Batches are dicts of numpy arrays of fixed
shape, so a jitted step compiles once. Packed pre-training blocks are tokenised as they are read,
a chunk of documents at a time, and each chunk's token ids may be cached on disk under a hash of
its texts and the tokenizer (`packed_lm_dataset`), so nothing passes over a whole corpus before
the first batch, nor again on resume.
"""

import hashlib
import io
import os
import uuid
import zipfile
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import grain
import grain.experimental
import jax
import numpy as np
from etils import epath

TextOrPair = str | tuple[str, str]
CHUNK_DOCUMENTS = 1024  # documents of a shard read, tokenised and cached together
TOKEN_CACHE_FORMAT = "es_jax token ids v1"  # part of every cache key: change it with the format


def _check_positive(**sizes: int) -> None:
    """Refuse sizes that are not positive integers."""
    for name, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def host_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """(index, count) of this host's shard; defaults to jax.process_index()/process_count()."""
    index = jax.process_index() if shard_index is None else shard_index
    count = jax.process_count() if shard_count is None else shard_count
    if count <= 0 or not 0 <= index < count:
        raise ValueError(f"shard_index must be in [0, shard_count), got {index} of {count}")
    return index, count


def tokenize_padded(
    texts: Sequence[TextOrPair], tokenizer, max_len: int, batch_size: int | None = None
) -> dict[str, np.ndarray]:
    """Tokenise texts (or text pairs) to `max_len`, padding rows up to `batch_size`.

    Returns int32 `input_ids`, `attention_mask` (and `token_type_ids` where the tokenizer makes
    them) of shape (batch_size, max_len), and float32 `weights`: 1 for a real row, 0 for padding.
    """
    rows = len(texts)
    batch_size = rows if batch_size is None else batch_size
    if rows > batch_size:
        raise ValueError(f"{rows} texts do not fit a batch of {batch_size}")
    if rows and isinstance(texts[0], tuple):
        segments = ([t[0] for t in texts], [t[1] for t in texts])
    else:
        segments = (list(texts),)
    # Pad by hand: causal-LM tokenizers often have no pad token.
    encoded = tokenizer(*segments, truncation=True, max_length=max_len)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id or 0
    batch = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in encoded:
            padded = np.full((batch_size, max_len), pad_id if key == "input_ids" else 0, np.int32)
            for row, values in enumerate(encoded[key]):
                padded[row, : len(values)] = values
            batch[key] = padded
    batch["weights"] = (np.arange(batch_size) < rows).astype(np.float32)
    return batch


def padded_batches(
    texts: Sequence[TextOrPair], tokenizer, max_len: int, batch_size: int
) -> grain.MapDataset:
    """Fixed-shape batches of `texts` in their given order, the last one padded (weights 0).

    A `grain.MapDataset`: iterate it, index it, or take `len()`. Each element is the dict of
    `tokenize_padded`.
    """
    _check_positive(max_len=max_len, batch_size=batch_size)
    if not texts:
        raise ValueError("padded_batches got no texts")
    texts = list(texts)
    num_batches = -(-len(texts) // batch_size)
    return grain.MapDataset.range(num_batches).map(
        lambda b: tokenize_padded(
            texts[b * batch_size : (b + 1) * batch_size], tokenizer, max_len, batch_size
        )
    )


class BatchPlan(NamedTuple):
    """One batch of `length_sorted_batches`: the texts' positions and the padded shape."""

    positions: np.ndarray  # int, into the texts, shortest first
    rows: int
    length: int


def padded_lengths(max_len: int) -> list[int]:
    """The lengths a sorted batch is padded to: 2, 3, then 1, 1.25, 1.5 and 1.75 x 2**k from 4
    (4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ...: a text of two tokens or more fills at least four
    fifths of its row), those below `max_len`, then `max_len`."""
    ladder, base = [2, 3], 4
    while base < max_len:
        ladder += [base * quarters // 4 for quarters in (4, 5, 6, 7)]
        base *= 2
    return [*(length for length in ladder if length < max_len), max_len]


def plan_sorted_batches(
    lengths: Sequence[int], max_len: int, batch_size: int, token_budget: int
) -> list[BatchPlan]:
    """Batches of texts sorted by token count (`lengths`, each <= max_len), shortest first.

    From the shortest text left, a batch takes its texts at the shortest length of
    `padded_lengths` at which either a full batch fits (`rows_for(length)` texts no longer than
    it) or every text left fits, and is padded to the shortest of `padded_lengths` that holds its
    longest text. A full batch has batch_size x 2**j rows, the most whose rows x length stay
    within `token_budget` (at least batch_size); the last one, the fewest multiple of batch_size
    rows that hold what is left. So every batch's rows divide by batch_size, only the last has
    padding rows (fewer than batch_size), and a batch holds no more tokens than `token_budget`
    unless batch_size rows alone exceed it.
    """

    def rows_for(length: int) -> int:
        rows = batch_size
        while rows * 2 * length <= token_budget:
            rows *= 2
        return rows

    def shortest_holding(tokens: int) -> int:
        return next(length for length in ladder if length >= tokens)

    def batch_from(start: int) -> BatchPlan:
        for length in ladder:
            if length < sorted_lengths[start]:
                continue
            full = rows_for(length)
            fits = int(np.searchsorted(sorted_lengths, length, side="right")) - start
            if fits >= full or start + fits == len(order):
                taken = min(fits, full)
                rows = -(-taken // batch_size) * batch_size
                longest = sorted_lengths[start + taken - 1]
                return BatchPlan(order[start : start + taken], rows, shortest_holding(longest))
        raise ValueError(f"a text of {sorted_lengths[start]} tokens is longer than max_len")

    ladder = padded_lengths(max_len)
    order = np.argsort(np.asarray(lengths), kind="stable")
    sorted_lengths = np.asarray(lengths)[order]
    plans, start = [], 0
    while start < len(order):
        plans.append(batch_from(start))
        start += len(plans[-1].positions)
    return plans


def length_sorted_batches(
    texts: Sequence[TextOrPair],
    tokenizer,
    max_len: int,
    batch_size: int,
    token_budget: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Batches of `texts` sorted by token count, each padded only as far as its longest text
    needs (`plan_sorted_batches`; token_budget defaults to batch_size x max_len).

    Each is the dict of `tokenize_padded` plus int32 `index`: each row's position in `texts`, -1
    on padding rows. A text's tokens are those `padded_batches` gives it (truncated to max_len),
    so a per-row result (an embedding) is the same up to float rounding, in far fewer padded
    tokens: put rows back in order with `index`. Shapes vary between batches but come from a
    short list (`padded_lengths` x a few row counts), so a jitted function compiles a few times.
    """
    _check_positive(max_len=max_len, batch_size=batch_size)
    if not texts:
        raise ValueError("length_sorted_batches got no texts")
    texts = list(texts)
    budget = batch_size * max_len if token_budget is None else token_budget
    _check_positive(token_budget=budget)
    # Tokenised once; the extra last row is all padding, for the batches' padding rows.
    every = tokenize_padded(texts, tokenizer, max_len, len(texts) + 1)
    lengths = every["attention_mask"][:-1].sum(axis=1)
    batches = []
    for plan in plan_sorted_batches(lengths, max_len, batch_size, budget):
        index = np.full(plan.rows, -1, np.int32)
        index[: len(plan.positions)] = plan.positions
        rows = np.where(index >= 0, index, len(texts))
        batch = {k: v[rows, : plan.length] if v.ndim == 2 else v[rows] for k, v in every.items()}
        batches.append({**batch, "index": index})
    return batches


def _is_encoder_tokenizer(tokenizer) -> bool:
    """True for BERT-style tokenizers ([CLS] ... [SEP]); False for causal-LM ones."""
    return tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None


def token_blocks(documents: Sequence[str], tokenizer, seq_len: int) -> np.ndarray:
    """The documents' tokens as consecutive (num_blocks, seq_len) int32 blocks.

    Documents are joined in order with a separator ([SEP] for BERT-style tokenizers, else EOS)
    and cut into blocks; the incomplete tail is dropped. BERT-style blocks are wrapped as
    [CLS] tokens... [SEP], so they hold seq_len - 2 corpus tokens each.
    """
    _check_positive(seq_len=seq_len)
    separator, content = _separator_and_content(tokenizer, seq_len)
    ids = _tokenize(list(documents), tokenizer)
    separator_array = np.asarray([separator], np.int32)
    stream = np.concatenate([piece for doc in ids for piece in (doc, separator_array)] or [[]])
    num_blocks = len(stream) // content
    if num_blocks == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one block of {content}")
    blocks = stream[: num_blocks * content].reshape(num_blocks, content).astype(np.int32)
    if _is_encoder_tokenizer(tokenizer):
        blocks = _wrap_blocks(blocks, tokenizer.cls_token_id, separator)
    return blocks


def _block_batch(input_ids: np.ndarray, with_token_types: bool) -> dict[str, np.ndarray]:
    """A batch dict from stacked token blocks (no padding inside packed blocks)."""
    batch = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}
    if with_token_types:
        batch["token_type_ids"] = np.zeros_like(input_ids)
    return batch


def packed_lm_dataset(
    documents: Sequence[str],
    tokenizer,
    seq_len: int,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    shard_index: int | Sequence[int] | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    chunk_documents: int = CHUNK_DOCUMENTS,
) -> grain.IterDataset:
    """Batches of packed token blocks for LM/MLM training, tokenised as they are read.

    The documents (any random-access sequence: a list, a `grain.MapDataset`) are dealt into
    `shard_count` shards: shard i holds documents i, i + shard_count, ... Each shard is a stream
    of its own: its documents in chunks of `chunk_documents` consecutive ones, each epoch the
    chunks in an order shuffled with `seed` and the documents of each chunk too (`shuffle`), each
    document's tokens followed by a separator ([SEP] for BERT-style tokenizers, else EOS); the
    stream of `num_epochs` epochs (None: forever) is cut into blocks of `seq_len` tokens
    (BERT-style: [CLS], seq_len - 2 tokens, [SEP]), a tail too short for a block dropped.
    Unshuffled, one epoch of one shard is `token_blocks` of that shard's documents. (Shards
    hold unequal text, so with `num_epochs` hosts may get unequal numbers of batches; a loop of
    a fixed number of steps reads the endless default.)

    `shard_index` is one shard or a list of them (defaults: jax process index/count): each batch
    holds `batch_size / len(shards)` consecutive blocks of each listed shard's stream, in the
    order listed, so hosts that list the shards of their devices build the global batch of one
    host holding them all. Only the listed shards' documents are read and tokenised, one chunk
    at a time when its stream reaches it. With `cache_dir`, a chunk's token ids are stored there
    under a hash of its texts and the tokenizer (`chunk_key`) and read back instead of tokenised
    again, by this or any later run. The iterator's `get_state()` / `set_state()` restore the
    exact position, reading back only the chunk that position lies in.
    """
    _check_positive(seq_len=seq_len, batch_size=batch_size, chunk_documents=chunk_documents)
    if num_epochs is not None:
        _check_positive(num_epochs=num_epochs)
    shards, count = stream_shards(shard_index, shard_count)
    if batch_size % len(shards):
        raise ValueError(
            f"batch_size {batch_size} is not a multiple of the {len(shards)} shards it is made of"
        )
    encoder = _is_encoder_tokenizer(tokenizer)
    separator, content = _separator_and_content(tokenizer, seq_len)
    cache = None
    if cache_dir is not None:
        cache = TokenCache(epath.Path(cache_dir), tokenizer_key(tokenizer))
    streams = []
    for shard in shards:
        texts = documents[shard::count]
        if len(texts) == 0:
            raise ValueError(
                f"shard {shard} of {count} holds none of the {len(documents)} documents; use "
                "more documents or fewer shards (devices)"
            )
        chunks = ChunkSource(texts, tokenizer, separator, chunk_documents, shuffle, cache)
        stream_seed = int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])
        streams.append(
            TokenBlocks(chunk_streams(chunks, stream_seed, num_epochs), content)
            .batch(batch_size // len(shards), drop_remainder=True)
        )
    blocks = grain.experimental.ZipIterDataset(streams, strict=False).map(np.concatenate)
    if encoder:
        blocks = blocks.map(partial(_wrap_blocks, cls=tokenizer.cls_token_id, sep=separator))
    return blocks.map(partial(_block_batch, with_token_types=encoder))


def stream_shards(
    shard_index: int | Sequence[int] | None, shard_count: int | None
) -> tuple[list[int], int]:
    """([shards], count) of `packed_lm_dataset`'s shard arguments; an int or None is one shard
    (None: this host's, `host_shard`)."""
    if shard_index is None or isinstance(shard_index, int | np.integer):
        index, count = host_shard(shard_index, shard_count)
        return [index], count
    shards = [int(i) for i in shard_index]
    count = jax.process_count() if shard_count is None else shard_count
    if not shards or len(set(shards)) < len(shards) or not all(0 <= i < count for i in shards):
        raise ValueError(f"shard_index must be distinct shards in [0, {count}), got {shards}")
    return shards, count


def _separator_and_content(tokenizer, seq_len: int) -> tuple[int, int]:
    """The token that ends each document, and the corpus tokens a block of seq_len holds."""
    encoder = _is_encoder_tokenizer(tokenizer)
    separator = tokenizer.sep_token_id if encoder else tokenizer.eos_token_id
    if separator is None:
        raise ValueError("packed LM blocks need a tokenizer with a [SEP] or EOS token")
    content = seq_len - 2 if encoder else seq_len
    if content <= 0:
        raise ValueError(f"seq_len {seq_len} leaves no room for tokens between [CLS] and [SEP]")
    return separator, content


def _wrap_blocks(blocks: np.ndarray, cls: int, sep: int) -> np.ndarray:
    """(rows, n) corpus-token blocks as (rows, n + 2) BERT inputs: [CLS] tokens [SEP]."""
    rows = len(blocks)
    return np.concatenate(
        [np.full((rows, 1), cls, np.int32), blocks, np.full((rows, 1), sep, np.int32)], axis=1
    )


# ----------------------------------------------------------------------------- streaming tokens


class TokenCache(NamedTuple):
    """A folder of tokenised chunks, and the hash of the tokenizer that every key includes."""

    directory: epath.Path
    tokenizer_key: str


class ChunkSource(NamedTuple):
    """One shard's documents as `chunk_stream` reads them."""

    texts: Sequence[str]
    tokenizer: object
    separator: int
    chunk_documents: int
    shuffle: bool
    cache: TokenCache | None


def chunk_streams(
    source: ChunkSource, seed: int, num_epochs: int | None
) -> grain.IterDataset:
    """The token streams of a shard's chunks, epoch after epoch (None: forever), the chunks of
    each epoch (and the documents in each) in an order drawn from `seed` when shuffling."""
    chunks = grain.MapDataset.range(-(-len(source.texts) // source.chunk_documents))
    if source.shuffle:
        chunks = chunks.shuffle(seed=seed)
    streams = chunks.repeat(num_epochs).random_map(partial(chunk_stream, source=source), seed=seed)
    # One chunk is read at a time, when the stream reaches it, in the caller's thread: under JAX's
    # asynchronous dispatch that overlaps with the devices' step already.
    return streams.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def chunk_stream(chunk: int, rng: np.random.Generator, source: ChunkSource) -> np.ndarray:
    """Chunk `chunk` of a shard as one int32 token stream: its documents' ids, each followed by
    the separator, in an order drawn from `rng` (in order when not shuffling)."""
    start = chunk * source.chunk_documents
    stop = min(start + source.chunk_documents, len(source.texts))
    ids = token_ids([source.texts[i] for i in range(start, stop)], source.tokenizer, source.cache)
    order = rng.permutation(len(ids)) if source.shuffle else range(len(ids))
    separator = np.asarray([source.separator], np.int32)
    return np.concatenate([piece for i in order for piece in (ids[i], separator)])


def token_ids(texts: list[str], tokenizer, cache: TokenCache | None) -> list[np.ndarray]:
    """Each text's int32 token ids without special tokens: read from `cache` where an earlier
    call stored these texts' ids for this tokenizer, else tokenised (and stored there)."""
    if cache is None:
        return _tokenize(texts, tokenizer)
    path = cache.directory / f"{chunk_key(texts, cache.tokenizer_key)}.npz"
    if path.exists():
        try:
            return _read_ids(path)
        except (OSError, ValueError, zipfile.BadZipFile):  # damaged: tokenise and store it again
            pass
    ids = _tokenize(texts, tokenizer)
    _write_ids(path, ids)
    return ids


def chunk_key(texts: Sequence[str], tokenizer_hash: str) -> str:
    """The cache key of tokenised texts: a SHA-256 of the cache format, the tokenizer's hash and
    every text (length-prefixed, so no two lists of texts share one key)."""
    digest = hashlib.sha256(f"{TOKEN_CACHE_FORMAT}\0{tokenizer_hash}\0".encode())
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def tokenizer_key(tokenizer) -> str:
    """A SHA-256 of a tokenizer's `tokenizers` JSON (vocabulary, normaliser, pre-tokeniser): what
    decides its ids. Fast transformers tokenizers and `WordPieceTokenizer` have one."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "backend", None)
    if not hasattr(backend, "to_str"):
        raise ValueError(
            f"a {type(tokenizer).__name__} has no `tokenizers` backend to key a token cache by; "
            "use a fast tokenizer, or no cache_dir"
        )
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def _tokenize(texts: list[str], tokenizer) -> list[np.ndarray]:
    """Each text's token ids without special tokens, as int32 arrays."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [np.asarray(doc, np.int32) for doc in ids]


def _read_ids(path: epath.Path) -> list[np.ndarray]:
    """Token ids stored by `_write_ids`."""
    with np.load(io.BytesIO(path.read_bytes())) as stored:
        tokens, lengths = stored["tokens"].astype(np.int32), stored["lengths"]
    return np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else []


def _write_ids(path: epath.Path, ids: list[np.ndarray]) -> None:
    """Stores token ids at `path` (uint16 where every id fits), atomically: a reader never
    sees a partly written file, and two hosts writing one key leave one whole file."""
    tokens = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    if tokens.size == 0 or tokens.max() < 2**16:
        tokens = tokens.astype(np.uint16)
    data = io.BytesIO()
    np.savez(data, tokens=tokens, lengths=np.asarray([len(doc) for doc in ids], np.int64))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = path.parent / f".{path.name}.{uuid.uuid4().hex}.partial"
    partial_path.write_bytes(data.getvalue())
    partial_path.replace(path)


class TokenBlocks(grain.IterDataset):
    """Consecutive `length`-token blocks cut from a stream of int32 token arrays, read on
    demand; a tail too short for a block is dropped. Its iterator's state is a position in the
    stream: the parent's state before the array being cut, and the tokens of it already used."""

    def __init__(self, parent: grain.IterDataset, length: int):
        super().__init__(parent)
        self._length = length

    def __iter__(self) -> grain.DatasetIterator:
        return _TokenBlocksIterator(self._parent.__iter__(), self._length)


class _TokenBlocksIterator(grain.DatasetIterator):
    """The iterator of `TokenBlocks`."""

    def __init__(self, parent: grain.DatasetIterator, length: int):
        super().__init__(parent)
        self._length = length
        self._array: np.ndarray | None = None  # the array being cut; None: not read yet
        self._array_state = parent.get_state()  # the parent's state before that array
        self._used = 0  # its tokens already in blocks

    def __next__(self) -> np.ndarray:
        parts, missing = [], self._length
        while missing:
            if self._array is not None and self._used == len(self._array):
                self._array, self._array_state, self._used = None, self._parent.get_state(), 0
            if self._array is None:
                self._array = next(self._parent)
            part = self._array[self._used : self._used + missing]
            parts.append(part)
            self._used += len(part)
            missing -= len(part)
        return np.concatenate(parts)

    def get_state(self) -> dict:
        return {"parent": self._array_state, "used": self._used}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._array, self._array_state, self._used = None, state["parent"], state["used"]


def subset_documents(documents: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded random `fraction` of the documents, in their original order.

    Subsets with one seed are nested: the 60% subset lies inside the 70% one, and so on.
    """
    return [documents[i] for i in subset_positions(len(documents), fraction, seed)]


def subset_positions(count: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted positions (int64) of `subset_documents` among `count` documents:
    `max(1, round(fraction * count))` of them, the first ones of a seeded permutation."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    keep = max(1, round(fraction * count))
    return np.sort(np.random.default_rng(seed).permutation(count)[:keep])
