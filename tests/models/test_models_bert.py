"""BERT: parity with transformers' PyTorch BERT (tiny random configs and real MiniLM), PRUNABLE,
name maps, bad checkpoints, and the prune -> export -> PyTorch round trip."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from es_jax import models, pruning
from es_jax.models import bert

TOL = 1e-4
SENTENCES = [
    "Sparse networks can match dense ones.",
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Hello!",
]


@nnx.jit
def forward(model, input_ids, attention_mask, token_type_ids):
    """One jitted forward pass of any BERT model."""
    return model(input_ids, attention_mask, token_type_ids)


def _tiny_inputs(vocab_size):
    """A padded batch of random ids with two segments."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab_size, size=(3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    types = np.zeros((3, 12), np.int64)
    types[:, 6:] = 1
    return ids, mask, types


def _torch_pair(tiny, torch_class, task, **kwargs):
    """A randomly initialised transformers model of config `tiny` and ours loaded from it."""
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(**tiny, **kwargs)
    theirs = torch_class(hf_config).eval()
    state = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    ours = models.from_hf(hf_config.to_dict(), state, task=task)
    return theirs, ours


def _numpy(outputs):
    """Torch or jax outputs as a tuple of numpy arrays."""
    if isinstance(outputs, tuple):
        return tuple(np.asarray(o) for o in outputs)
    return (np.asarray(outputs),)


@pytest.mark.parametrize(
    ("torch_class", "task", "fields"),
    [
        (transformers.BertModel, None, ("last_hidden_state",)),
        (transformers.BertForMaskedLM, "mlm", ("logits",)),
        (transformers.BertForSequenceClassification, "classification", ("logits",)),
        (transformers.BertForQuestionAnswering, "qa", ("start_logits", "end_logits")),
    ],
)
def test_tiny_bert_matches_pytorch(tiny_bert, torch_class, task, fields):
    num_labels = 3 if task == "classification" else 2
    theirs, ours = _torch_pair(tiny_bert, torch_class, task, num_labels=num_labels)
    ids, mask, types = _tiny_inputs(tiny_bert["vocab_size"])
    with torch.no_grad():
        out = theirs(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        )
    expected = tuple(getattr(out, f).numpy() for f in fields)
    got = _numpy(forward(ours, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
    valid = mask.astype(bool)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        if g.ndim >= 2 and g.shape[:2] == valid.shape:
            g, e = g[valid], e[valid]
        np.testing.assert_allclose(g, e, atol=TOL)


def test_token_type_ids_change_the_output(tiny_bert):
    _, ours = _torch_pair(tiny_bert, transformers.BertModel, None)
    ids, mask, types = _tiny_inputs(tiny_bert["vocab_size"])
    a = forward(ours, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    b = forward(ours, jnp.asarray(ids), jnp.asarray(mask), jnp.zeros_like(jnp.asarray(types)))
    assert not np.allclose(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def minilm():
    """The bundled MiniLM, its tokenizer and a tokenised padded batch."""
    model, tokenizer = models.load("minilm")
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    return model, tokenizer, batch


def _torch_bert(folder_or_model, batch):
    """last_hidden_state of transformers' BertModel (from a folder) on a numpy batch."""
    theirs = transformers.BertModel.from_pretrained(folder_or_model).eval()
    with torch.no_grad():
        out = theirs(**{k: torch.tensor(v) for k, v in batch.items()})
    return out.last_hidden_state.numpy()


def _ours(model, batch):
    """Our last hidden state on a numpy batch."""
    return np.asarray(
        forward(
            model,
            jnp.asarray(batch["input_ids"]),
            jnp.asarray(batch["attention_mask"]),
            jnp.asarray(batch["token_type_ids"]),
        )
    )


def test_minilm_matches_pytorch(minilm):
    model, _, batch = minilm
    expected = _torch_bert(str(models.hub.bundled_location("minilm")), batch)
    np.testing.assert_allclose(_ours(model, batch), expected, atol=TOL)


def test_minilm_sentence_embeddings_rank_paraphrases_closest(minilm):
    model, tokenizer, _ = minilm
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell."]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    embeddings = bert.mean_pool(jnp.asarray(_ours(model, batch)), batch["attention_mask"])
    embeddings = embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
    similarity = np.asarray(embeddings @ embeddings.T)
    assert similarity[0, 1] > similarity[0, 2] + 0.2


def test_mean_pool_averages_real_tokens_only():
    hidden = jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4)
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    pooled = np.asarray(bert.mean_pool(hidden, mask))
    np.testing.assert_allclose(pooled[0], np.asarray(hidden[0, :2]).mean(0))
    np.testing.assert_allclose(pooled[1], np.asarray(hidden[1]).mean(0))


def test_pruned_minilm_round_trips_through_pytorch(minilm, bert_hf_modules, tmp_path):
    model, tokenizer, batch = minilm
    params = nnx.state(model, nnx.Param)
    pruned, mask = pruning.omp(params, 0.5, where=bert.PRUNABLE)
    clone = nnx.merge(*nnx.split(model))
    nnx.update(clone, pruned)
    folder = models.export(clone, tmp_path / "pruned", tokenizer)

    theirs = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = theirs(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state
    np.testing.assert_allclose(_ours(clone, batch), expected.numpy(), atol=TOL)

    exported = {k: v.numpy() for k, v in theirs.state_dict().items()}
    kept = dict(zip(pruning.leaf_paths(mask), jax.tree.leaves(mask), strict=True))
    zeros = total = 0
    for i in range(model.config.num_hidden_layers):
        for ours, hf in bert_hf_modules.items():
            weight = exported[f"encoder.layer.{i}.{hf}.weight"]
            np.testing.assert_array_equal(weight != 0, kept[f"encoder/layers/{i}/{ours}/kernel"].T)
            zeros, total = zeros + int((weight == 0).sum()), total + weight.size
    assert zeros == round(0.5 * total)
    np.testing.assert_array_equal(
        exported["embeddings.word_embeddings.weight"],
        model.embeddings.word_embeddings.embedding[...],
    )


def _prunable_paths(model):
    """Parameter paths the family's PRUNABLE selects."""
    pattern = re.compile(bert.PRUNABLE)
    return [p for p in pruning.leaf_paths(nnx.state(model, nnx.Param)) if pattern.fullmatch(p)]


@pytest.mark.parametrize("task", [None, "mlm", "classification", "qa"])
def test_prunable_selects_exactly_six_kernels_per_layer(tiny_bert, task):
    config = bert.BertConfig(**tiny_bert)
    model = bert.build(config, task, rngs=nnx.Rngs(0))
    selected = _prunable_paths(model)
    assert len(selected) == 6 * config.num_hidden_layers
    for path in selected:
        assert path.endswith("/kernel")
        assert re.search(r"/(query|key|value|out|up|down)/kernel$", path)
        assert not re.search(r"embed|norm|pooler|classifier|qa_outputs|mlm", path)
    assert models.prunable(model) == bert.PRUNABLE


def test_config_round_trips_through_hf_dict(tiny_bert):
    config = bert.BertConfig(**tiny_bert, hidden_act="gelu_new", layer_norm_eps=1e-7)
    assert bert.config_from_hf(bert.config_to_hf(config)) == config


def test_bert_base_names_with_prefix_and_gamma_beta_load_into_the_encoder(tiny_bert):
    theirs, _ = _torch_pair(tiny_bert, transformers.BertForMaskedLM, "mlm")
    state = {}
    for name, value in theirs.state_dict().items():
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma")
        state[name.replace("LayerNorm.bias", "LayerNorm.beta")] = value.numpy()
    model = models.from_hf(theirs.config.to_dict(), state)
    assert isinstance(model, bert.BertModel)
    ids, mask, types = _tiny_inputs(tiny_bert["vocab_size"])
    with torch.no_grad():
        expected = theirs.bert(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        ).last_hidden_state
    got = forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[valid], expected.numpy()[valid], atol=TOL)


def test_shape_mismatch_names_the_key_and_both_shapes(tiny_bert, assert_refused_untouched):
    theirs, _ = _torch_pair(tiny_bert, transformers.BertModel, None)
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    state["encoder.layer.1.intermediate.dense.weight"] = np.zeros((65, 32), np.float32)
    model = bert.BertModel(bert.BertConfig(**tiny_bert), rngs=nnx.Rngs(0))
    expected = r"intermediate\.dense\.weight.*\(65, 32\).*\(64, 32\)"
    assert_refused_untouched(model, state, expected)


def test_missing_tensor_is_named_and_nothing_loaded(tiny_bert, assert_refused_untouched):
    theirs, _ = _torch_pair(tiny_bert, transformers.BertModel, None)
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    del state["encoder.layer.0.attention.self.value.bias"]
    model = bert.BertModel(bert.BertConfig(**tiny_bert), rngs=nnx.Rngs(0))
    expected = r"encoder\.layer\.0\.attention\.self\.value\.bias"
    assert_refused_untouched(model, state, expected)


def test_new_task_head_keeps_its_initialisation_when_the_checkpoint_has_none(tiny_bert):
    theirs, _ = _torch_pair(tiny_bert, transformers.BertModel, None)
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    model = models.from_hf(theirs.config.to_dict(), state, task="classification", num_labels=5)
    kernel = np.asarray(model.classifier.kernel[...])
    assert kernel.shape == (32, 5)
    assert 0.005 < kernel.std() < 0.05


def test_dropout_is_off_after_loading_and_on_in_train_mode(tiny_bert):
    _, ours = _torch_pair(tiny_bert, transformers.BertModel, None)
    ids, mask, types = (jnp.asarray(a) for a in _tiny_inputs(tiny_bert["vocab_size"]))
    np.testing.assert_array_equal(forward(ours, ids, mask, types), forward(ours, ids, mask, types))
    ours.train()
    assert not np.allclose(forward(ours, ids, mask, types), forward(ours, ids, mask, types))

