"""GGUF reading: config, de-permuted fp32 tensors and the byte-level BPE tokenizer, offline."""

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import pre_tokenizers

from es_jax.models.gguf import (
    read_gguf,
    read_metadata,
    smollm2_path,
    tokenizer_from_metadata,
    unpermute_rope_rows,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTE_TOKENS = sorted(pre_tokenizers.ByteLevel.alphabet())
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a"]
TOKENS = SPECIAL_TOKENS + BYTE_TOKENS + ["Ġt", "he", "Ġthe", "Ġa"]
TINY_LLAMA = dict(
    vocab_size=len(TOKENS), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    pad_token_id=2,
)
GGUF_BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's conversion of HF q/k rows (rotate-half) to its interleaved RoPE order."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_name(hf_name: str) -> str:
    """The GGUF name llama.cpp's converter gives an HF Llama tensor."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_BLOCK_NAMES[module]}.{kind}"


def write_llama_gguf(path, state_dict: dict, config: dict, *, arch: str = "llama",
                     pre: str = "smollm", extra_tensor=None) -> None:
    """Writes an HF Llama state dict as an F32 GGUF file, as llama.cpp's converter lays it out."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(TOKENS) - len(SPECIAL_TOKENS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    for name, value in state_dict.items():
        value = value.numpy().astype(np.float32)
        if "q_proj" in name:
            value = llama_cpp_permute(value, config["num_attention_heads"])
        if "k_proj" in name:
            value = llama_cpp_permute(value, config["num_key_value_heads"])
        writer.add_tensor(gguf_name(name), value)
    if extra_tensor is not None:
        writer.add_tensor(*extra_tensor[:2], raw_dtype=extra_tensor[2])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def torch_llama():
    """A random tiny HF Llama (GQA, untied) in PyTorch."""
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, torch_llama):
    """The tiny Llama written as a GGUF file, and what read_gguf makes of it."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_llama_gguf(path, torch_llama.state_dict(), TINY_LLAMA)
    return path, read_gguf(path)


def test_config_from_metadata_matches_hf(tiny_gguf):
    _, (config, _, _) = tiny_gguf
    for key, value in TINY_LLAMA.items():
        assert config[key] == value, key
    assert config["model_type"] == "llama"
    assert config["head_dim"] == TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]


def test_tensors_are_the_hf_state_dict_with_qk_unpermuted(tiny_gguf, torch_llama):
    _, (_, tensors, _) = tiny_gguf
    state_dict = torch_llama.state_dict()
    assert set(tensors) == set(state_dict)
    for name, value in state_dict.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], value.numpy(), err_msg=name)


def test_unpermute_inverts_llama_cpp_permute():
    weight = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    permuted = llama_cpp_permute(weight, num_heads=3)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, num_heads=3), weight)


def test_tied_embeddings_when_no_output_tensor(tmp_path, torch_llama):
    state_dict = {k: v for k, v in torch_llama.state_dict().items() if k != "lm_head.weight"}
    write_llama_gguf(tmp_path / "tied.gguf", state_dict, TINY_LLAMA)
    config, tensors, _ = read_gguf(tmp_path / "tied.gguf")
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in tensors


def test_tokenizer_ids_follow_the_metadata_vocab_and_merges(tiny_gguf):
    _, (_, _, tokenizer) = tiny_gguf
    token_id = {token: index for index, token in enumerate(TOKENS)}
    assert tokenizer.encode(" the") == [token_id["Ġthe"]]
    assert tokenizer.encode("the a") == [token_id["t"], token_id["he"], token_id["Ġa"]]
    assert tokenizer.encode("<|im_start|>x") == [token_id["<|im_start|>"], token_id["x"]]
    # The "smollm" pre-tokenizer splits digits one by one.
    assert tokenizer.encode("12") == [token_id["1"], token_id["2"]]
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("text", ["the theme", "café ✓ 日本 42!", "<|im_start|>hi\n<|im_end|>"])
def test_tokenizer_round_trips(tiny_gguf, text):
    _, (_, _, tokenizer) = tiny_gguf
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unsupported_quantisation_is_refused_naming_tensor_and_type(tmp_path, torch_llama):
    q8_k = gguf.GGMLQuantizationType.Q8_K
    _, type_size = gguf.GGML_QUANT_SIZES[q8_k]
    raw = np.zeros((4, type_size), dtype=np.uint8)
    extra = ("blk.0.weird.weight", raw, q8_k)
    write_llama_gguf(tmp_path / "q8k.gguf", torch_llama.state_dict(), TINY_LLAMA,
                     extra_tensor=extra)
    with pytest.raises(ValueError, match=r"blk\.0\.weird\.weight.*Q8_K"):
        read_gguf(tmp_path / "q8k.gguf")


def test_unsupported_architecture_is_refused(tmp_path, torch_llama):
    write_llama_gguf(tmp_path / "falcon.gguf", torch_llama.state_dict(), TINY_LLAMA, arch="falcon")
    with pytest.raises(ValueError, match=r"'falcon'.*supported: llama"):
        read_gguf(tmp_path / "falcon.gguf")


def test_unsupported_pre_tokenizer_is_refused(tmp_path, torch_llama):
    write_llama_gguf(tmp_path / "pre.gguf", torch_llama.state_dict(), TINY_LLAMA, pre="qwen2")
    with pytest.raises(ValueError, match="pre-tokenizer 'qwen2'"):
        read_gguf(tmp_path / "pre.gguf")


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_gguf(tmp_path / "absent.gguf")


def test_smollm2_tokenizer_follows_gguf_vocabulary():
    metadata = read_metadata(gguf.GGUFReader(smollm2_path()))
    tokenizer = tokenizer_from_metadata(metadata)
    vocabulary = {token: index for index, token in enumerate(metadata["tokenizer.ggml.tokens"])}
    expected = [vocabulary[t] for t in ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]]
    assert tokenizer.encode("The capital of France is") == expected
    bos = metadata["tokenizer.ggml.bos_token_id"]
    assert tokenizer.encode("<|im_start|>user") == [bos, vocabulary["user"]]
    texts = ["Année 2024: 3.14 ≈ π\n\tdone", "<|im_start|>assistant\nHi!<|im_end|>"]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("keep_bytes", [0, 4096, 1_000_000])
def test_a_truncated_gguf_file_is_named(tmp_path, keep_bytes):
    with open(smollm2_path(), "rb") as source:
        (tmp_path / "smollm2.gguf").write_bytes(source.read(keep_bytes))
    with pytest.raises(ValueError, match=rf"^{tmp_path}/smollm2\.gguf cannot be read as GGUF "
                       rf"\(.*; {keep_bytes} bytes\); the file is truncated or corrupt") as caught:
        read_gguf(tmp_path / "smollm2.gguf")
    assert "\n" not in str(caught.value)
