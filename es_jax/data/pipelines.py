"""grain pipelines: padded evaluation batches, packed LM/MLM token blocks, document subsets.

Every pipeline is a pure function of its arguments (texts, tokenizer, sizes, seed, shard): the
same call gives the same batches in the same order. Batches are dicts of numpy arrays of fixed
shape, so a jitted step compiles once.
"""

from collections.abc import Sequence

import grain
import jax
import numpy as np

TextOrPair = str | tuple[str, str]


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
    encoder = _is_encoder_tokenizer(tokenizer)
    separator = tokenizer.sep_token_id if encoder else tokenizer.eos_token_id
    if separator is None:
        raise ValueError("token_blocks needs a tokenizer with a [SEP] or EOS token")
    content = seq_len - 2 if encoder else seq_len
    if content <= 0:
        raise ValueError(f"seq_len {seq_len} leaves no room for tokens between [CLS] and [SEP]")
    ids = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    stream = np.concatenate(
        [np.asarray([*doc, separator], dtype=np.int32) for doc in ids] or [np.zeros(0, np.int32)]
    )
    num_blocks = len(stream) // content
    if num_blocks == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one block of {content}")
    blocks = stream[: num_blocks * content].reshape(num_blocks, content)
    if encoder:
        cls = np.full((num_blocks, 1), tokenizer.cls_token_id, np.int32)
        sep = np.full((num_blocks, 1), tokenizer.sep_token_id, np.int32)
        blocks = np.concatenate([cls, blocks, sep], axis=1)
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
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
) -> grain.IterDataset:
    """Batches of packed token blocks for LM/MLM training, resumable through its iterator.

    Each host takes every `shard_count`-th block from `shard_index` (defaults: jax process
    index/count; blocks beyond an equal share are dropped so hosts step together). Blocks are
    shuffled per epoch with `seed` (a new order each epoch), repeated `num_epochs` times
    (None: forever), and batched `batch_size` per host with the remainder dropped. The
    iterator's `get_state()` / `set_state()` restore the exact position.
    """
    _check_positive(seq_len=seq_len, batch_size=batch_size)
    if num_epochs is not None:
        _check_positive(num_epochs=num_epochs)
    index, count = host_shard(shard_index, shard_count)
    blocks = token_blocks(documents, tokenizer, seq_len)
    per_host = len(blocks) // count
    if per_host < batch_size:
        raise ValueError(
            f"{len(blocks)} blocks of {seq_len} tokens over {count} hosts do not fill a batch of "
            f"{batch_size}; use more text, a shorter seq_len or a smaller batch"
        )
    dataset = grain.MapDataset.source(blocks[: per_host * count])[index::count]
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs).batch(batch_size, drop_remainder=True)
    with_token_types = _is_encoder_tokenizer(tokenizer)
    batches = dataset.map(lambda ids: _block_batch(ids, with_token_types))
    # Blocks are tokenised up front, so reading is a cheap in-memory gather: no thread pool.
    return batches.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def subset_documents(documents: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded random `fraction` of the documents, in their original order.

    Subsets with one seed are nested: the 60% subset lies inside the 70% one, and so on.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    keep = max(1, round(fraction * len(documents)))
    order = np.random.default_rng(seed).permutation(len(documents))
    return [documents[i] for i in np.sort(order[:keep])]
