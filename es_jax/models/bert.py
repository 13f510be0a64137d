"""BERT in Flax NNX: encoder, MLM / sequence-classification / QA heads, HF checkpoint name map.

Post-LN blocks as in Hugging Face `BertModel`. Parameter paths (what `pruning` selectors see):
`encoder/layers/{i}/attention/{query,key,value,out}/kernel` and
`encoder/layers/{i}/mlp/{up,down}/kernel`, prefixed with `bert/` inside the task models.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from es_jax.models import family, hf_names, layers

MODEL_TYPES = ("bert",)

PRUNABLE = (
    r"(?:.*/)?encoder/layers/\d+/(?:attention/(?:query|key|value|out)|mlp/(?:up|down))/kernel"
)

SIGNATURE = r"(?:.*/)?embeddings/word_embeddings/embedding"

TASKS = ("mlm", "classification", "qa")

layer_of, component_of = family.block_paths("encoder/layers")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyper-parameters, named as in Hugging Face's config.json."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    dtype: Any = None
    param_dtype: Any = jnp.float32


def config_from_hf(hf: dict) -> BertConfig:
    """A `BertConfig` from a Hugging Face config.json dict (unknown fields ignored)."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"position_embedding_type={hf['position_embedding_type']!r} is not supported; "
            "only 'absolute' BERT checkpoints load."
        )
    names = {f.name for f in dataclasses.fields(BertConfig)} - {"dtype", "param_dtype"}
    return BertConfig(**{k: v for k, v in hf.items() if k in names})


def config_to_hf(config: BertConfig) -> dict:
    """The Hugging Face config.json dict of `config`."""
    hf = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("dtype", "param_dtype")}
    return {"model_type": "bert", "position_embedding_type": "absolute", **hf}


class BertEmbeddings(layers.TextEmbeddings):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        super().__init__(
            config.vocab_size,
            config.hidden_size,
            max_positions=config.max_position_embeddings,
            type_vocab_size=config.type_vocab_size,
            **layers.layer_kwargs(config, rngs),
        )
        self.norm = layers.hidden_layer_norm(config, rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None) -> jax.Array:
        """Embeds token ids (B, L) into (B, L, hidden)."""
        x = super().__call__(input_ids, token_type_ids=token_type_ids)
        return self.dropout(self.norm(x))


class BertLayer(nnx.Module):
    """One post-LN encoder block: attention, add & norm, MLP, add & norm."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        common = layers.layer_kwargs(config, rngs)
        self.attention = layers.Attention(
            config.hidden_size,
            config.num_attention_heads,
            dropout_rate=config.attention_probs_dropout_prob,
            **common,
        )
        self.attention_norm = layers.hidden_layer_norm(config, rngs)
        self.mlp = layers.Mlp(
            config.hidden_size,
            config.intermediate_size,
            activation_name=config.hidden_act,
            **common,
        )
        self.mlp_norm = layers.hidden_layer_norm(config, rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        """Applies the block to (B, L, hidden)."""
        attended = self.attention(x, attention_mask=attention_mask)
        x = self.attention_norm(x + self.dropout(attended))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class BertEncoder(nnx.Module):
    """The stack of encoder blocks."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [BertLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        """Applies every block in turn."""
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x


class BertModel(nnx.Module):
    """The BERT encoder; `__call__` returns the last hidden state (B, L, hidden)."""

    def __init__(self, config: BertConfig, *, add_pooling_layer: bool = True, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.encoder = BertEncoder(config, rngs=rngs)
        self.pooler = layers.pooler(config, rngs, enabled=add_pooling_layer)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Encodes token ids (B, L); `attention_mask` is 1 for real tokens, 0 for padding."""
        x = self.embeddings(input_ids, token_type_ids)
        return self.encoder(x, attention_mask)

    def pool(self, hidden: jax.Array) -> jax.Array:
        """BERT's pooled output: tanh(dense(hidden state of the first token))."""
        return layers.first_token_pool(self.pooler, hidden)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Mean of the hidden states over the real tokens (B, L, H) -> (B, H), not normalised."""
    if attention_mask is None:
        return jnp.mean(hidden, axis=1)
    weights = attention_mask.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)


class MlmHead(nnx.Module):
    """Transform (dense, activation, LayerNorm), then logits tied to the word embeddings + bias."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.dense = layers.linear(
            config.hidden_size, config.hidden_size, **layers.layer_kwargs(config, rngs)
        )
        self.activation = layers.activation(config.hidden_act)
        self.norm = layers.hidden_layer_norm(config, rngs)
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,), config.param_dtype))

    def __call__(self, hidden: jax.Array, word_embeddings: nnx.Embed) -> jax.Array:
        """Vocabulary logits (B, L, V)."""
        x = self.norm(self.activation(self.dense(hidden)))
        return word_embeddings.attend(x) + self.bias[...]


class BertWithHead(nnx.Module):
    """BERT as `bert` and a task head on its last hidden state; subclasses define `head`."""

    def __init__(self, config: BertConfig, *, add_pooling_layer: bool, rngs: nnx.Rngs):
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=add_pooling_layer, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> Any:
        """The head's output for token ids (B, L); `attention_mask` is 0 on padding."""
        return self.head(self.bert(input_ids, attention_mask, token_type_ids))

    def head(self, hidden: jax.Array) -> Any:
        """The task output from BERT's last hidden state (B, L, hidden)."""
        raise NotImplementedError


class BertForMaskedLM(BertWithHead):
    """BERT with the masked-language-model head (decoder tied to the word embeddings)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        super().__init__(config, add_pooling_layer=False, rngs=rngs)
        self.mlm = MlmHead(config, rngs=rngs)

    def head(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary logits (B, L, V)."""
        return self.mlm(hidden, self.bert.embeddings.word_embeddings)


class BertForSequenceClassification(BertWithHead):
    """BERT, pooler, dropout and a linear classifier."""

    def __init__(self, config: BertConfig, num_labels: int = 2, *, rngs: nnx.Rngs):
        super().__init__(config, add_pooling_layer=True, rngs=rngs)
        self.num_labels = num_labels
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)
        self.classifier = layers.linear(
            config.hidden_size, num_labels, **layers.layer_kwargs(config, rngs)
        )

    def head(self, hidden: jax.Array) -> jax.Array:
        """Class logits (B, num_labels)."""
        return self.classifier(self.dropout(self.bert.pool(hidden)))


class BertForQuestionAnswering(BertWithHead):
    """BERT with a span head: start and end logits for every token."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        super().__init__(config, add_pooling_layer=False, rngs=rngs)
        self.qa_outputs = layers.linear(config.hidden_size, 2, **layers.layer_kwargs(config, rngs))

    def head(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(start_logits, end_logits), each (B, L)."""
        logits = self.qa_outputs(hidden)
        return logits[..., 0], logits[..., 1]


def build(
    config: BertConfig, task: str | None, *, rngs: nnx.Rngs, num_labels: int = 2
) -> nnx.Module:
    """The BERT model for `task`: None (the encoder), "mlm", "classification" or "qa"."""
    if task is None:
        return BertModel(config, rngs=rngs)
    if task == "mlm":
        return BertForMaskedLM(config, rngs=rngs)
    if task == "classification":
        return BertForSequenceClassification(config, num_labels, rngs=rngs)
    if task == "qa":
        return BertForQuestionAnswering(config, rngs=rngs)
    raise family.unknown_task("BERT", task, TASKS)


# ----------------------------------------------------------------------------------------------
# Hugging Face names.


def _encoder_specs(config: BertConfig, pooler: bool) -> list[hf_names.WeightSpec]:
    """Specs of a `BertModel`, HF names without the `bert.` prefix."""
    specs = [
        *hf_names.embed_specs("embeddings.word_embeddings", ("embeddings", "word_embeddings")),
        *hf_names.embed_specs(
            "embeddings.position_embeddings", ("embeddings", "position_embeddings")
        ),
        *hf_names.embed_specs(
            "embeddings.token_type_embeddings", ("embeddings", "token_type_embeddings")
        ),
        *hf_names.norm_specs("embeddings.LayerNorm", ("embeddings", "norm")),
    ]
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}", ("encoder", "layers", i)
        for name in ("query", "key", "value"):
            specs += hf_names.linear_specs(
                f"{hf}.attention.self.{name}", (*ours, "attention", name)
            )
        specs += hf_names.linear_specs(f"{hf}.attention.output.dense", (*ours, "attention", "out"))
        specs += hf_names.norm_specs(f"{hf}.attention.output.LayerNorm", (*ours, "attention_norm"))
        specs += hf_names.linear_specs(f"{hf}.intermediate.dense", (*ours, "mlp", "up"))
        specs += hf_names.linear_specs(f"{hf}.output.dense", (*ours, "mlp", "down"))
        specs += hf_names.norm_specs(f"{hf}.output.LayerNorm", (*ours, "mlp_norm"))
    if pooler:
        specs += hf_names.linear_specs("pooler.dense", ("pooler",), optional=True)
    return specs


def weight_specs(model: nnx.Module) -> list[hf_names.WeightSpec]:
    """The HF <-> NNX name map of any BERT model of this module."""
    if isinstance(model, BertModel):
        specs = _encoder_specs(model.config, model.pooler is not None)
        return hf_names.accept_prefixed(specs, "bert.")
    specs = hf_names.nested(_encoder_specs(model.config, model.bert.pooler is not None), "bert")
    if isinstance(model, BertForMaskedLM):
        head = "cls.predictions"
        specs += hf_names.linear_specs(f"{head}.transform.dense", ("mlm", "dense"), optional=True)
        specs += hf_names.norm_specs(f"{head}.transform.LayerNorm", ("mlm", "norm"), optional=True)
        specs.append(hf_names.WeightSpec(f"{head}.bias", ("mlm", "bias"), optional=True))
    elif isinstance(model, BertForSequenceClassification):
        specs += hf_names.linear_specs("classifier", ("classifier",), optional=True)
    elif isinstance(model, BertForQuestionAnswering):
        specs += hf_names.linear_specs("qa_outputs", ("qa_outputs",), optional=True)
    else:
        raise TypeError(f"{type(model).__name__} is not a BERT model of es_jax.models.bert")
    return specs


def load_hf_tensors(model: nnx.Module, tensors: dict[str, np.ndarray]) -> None:
    """Fills `model` in place from a Hugging Face BERT state dict (validated before assigning)."""
    hf_names.assign_hf_tensors(model, weight_specs(model), tensors, family="BERT")


def export_hf_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The Hugging Face state dict of `model` (loads into the matching transformers class)."""
    tensors = hf_names.collect_hf_tensors(model, weight_specs(model))
    if isinstance(model, BertForMaskedLM):
        tensors["cls.predictions.decoder.weight"] = tensors[
            "bert.embeddings.word_embeddings.weight"
        ]
        tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"]
    return tensors
