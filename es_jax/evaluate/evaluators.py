"""Jitted evaluators whose parameters are an argument, so a sweep compiles each one once.

An evaluator owns its pre-tokenised batches and a jitted forward pass `fn(params, rest, batch)`
built from the model's NNX graph definition. Calling it with the pruned parameters of any
sparsity level reuses the compiled programs: one per batch shape (text batches sorted by length
come in a few shapes; every other evaluator's batches have one), since the parameters keep their
structure and dtypes. `compilations()` reads the jit cache sizes, so tests and benchmarks can
check that ten levels cost no more compilations than one.

A sweep keeps no pruned copy of the weights: `evaluator(params, levels, level)` takes the dense
parameters and a tree of nested pruning levels (`pruning.levels`, one uint8 per target weight)
and zeroes the weights level `level` prunes inside the compiled forward pass (`Masked`); level -1
prunes nothing, so the dense model and every level share one compiled program.

On a device mesh (`mesh=` of the builders) the batches are split along their first axis over all
its devices (`es_jax.mesh.batch_sharding`; the batch size must divide by the device count), the
parameters keep the sharding they come with, and every output is replicated, so each host reads
the whole result.

Batches are dicts of numpy arrays with `input_ids`, `attention_mask` (optionally `token_type_ids`,
`pixel_values`, `label`, ...) and `weights` (1 for real rows, 0 for padding rows). The k-NN
evaluator recomputes its bank's and test images' features from the parameters it is given, so a
pruned level is judged on its own features.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from es_jax import pruning
from es_jax.evaluate import metrics
from es_jax.mesh import batch_sharding, put, replicated

Batch = dict[str, np.ndarray]
Apply = Callable[[nnx.Module, dict[str, jax.Array]], Any]
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DENSE = -1  # the level index that prunes nothing


class Masked(NamedTuple):
    """Parameters with nested pruning levels, pruned inside the compiled forward pass.

    `levels` is a tree made by `pruning.levels` (uint8 on target leaves, None elsewhere) with the
    parameters' structure; `level` an int32 scalar. The forward pass sees each target weight
    where its levels value exceeds `level` (`pruning.mask_at(levels, level)`) and 0 elsewhere;
    `level` -1 (DENSE) keeps every weight. Every level has the same shapes, so one compiled
    program serves them all.
    """

    params: Any
    levels: Any
    level: Any


def masked_params(masked: Masked) -> Any:
    """The parameters level `masked.level` leaves: `pruning.apply(params, levels > level)` (jit-
    able, the level traced)."""
    keep = jax.tree.map(lambda levels: levels > masked.level, masked.levels)
    return pruning.apply(masked.params, keep)


@dataclass(frozen=True)
class Forward:
    """A model's forward pass as a jitted function of its parameters (a tree, or `Masked`) and a
    batch."""

    jitted: Callable
    rest: Any

    def __call__(self, params: Any, batch: dict[str, Any]) -> Any:
        """Runs the compiled forward pass with these parameters."""
        return self.jitted(params, self.rest, batch)

    def compilations(self) -> int:
        """How many programs the jit cache holds (one per batch shape, however many levels)."""
        return self.jitted._cache_size()


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Switches the model to eval mode and splits it into graph, parameters and the rest."""
    model.eval()
    return nnx.split(model, nnx.Param, ...)


def make_forward(model: nnx.Module, apply: Apply, mesh: Mesh | None = None) -> Forward:
    """Jits `apply(model, batch)` as a pure function of (params, rest, batch), where params is a
    parameter tree or `Masked` (pruned inside the program). The non-parameter state (`rest`) is
    a copy of the model's at this call, so later runs of the model (which advance its RNG
    counters) neither change what the evaluator computes nor recompile it. On a mesh that state
    is replicated over it and every output is replicated."""
    graphdef, _, rest = split_params(model)
    rest = jax.tree.map(lambda x: x, rest)  # new variables: the model's own change in place

    def forward(params: Any, rest: nnx.State, batch: dict[str, jax.Array]) -> Any:
        if isinstance(params, Masked):
            params = masked_params(params)
        return apply(nnx.merge(graphdef, params, rest), batch)

    if mesh is None:
        return Forward(jax.jit(forward), rest)
    placed = put(rest, replicated(mesh))
    return Forward(jax.jit(forward, out_shardings=replicated(mesh)), placed)


@dataclass
class Evaluator:
    """One task's metric as a function of the parameters: `__call__(params, levels=None,
    level=DENSE) -> float`. `score` takes a parameter tree or `Masked` and hands it unopened to
    its `forwards`, which prune inside their programs."""

    task: str
    metric: str
    higher_is_better: bool
    score: Callable[[Any], float]
    forwards: tuple[Forward, ...]
    num_examples: int

    def __call__(self, params: Any, levels: Any = None, level: int = DENSE) -> float:
        """The metric of the model with these parameters; with `levels` (a `pruning.levels`
        tree) that of level `level`, its pruned weights zeroed inside the compiled forward pass
        (`Masked`; level -1, DENSE, prunes nothing). Calls with `levels` share one compiled
        program, calls without it another."""
        if levels is None:
            return float(self.score(params))
        return float(self.score(Masked(params, levels, np.int32(level))))

    def compilations(self) -> int:
        """Total number of compiled programs behind this evaluator."""
        return sum(forward.compilations() for forward in self.forwards)


def text_inputs(model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The keyword arguments (attention mask, token types) of the batch that the model takes."""
    accepted = inspect.signature(model.__call__).parameters
    return {
        k: batch[k] for k in ("attention_mask", "token_type_ids") if k in batch and k in accepted
    }


def mean_pooled(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
    """L2-normalised mean of the last hidden state over the attention mask, (B, H)."""
    hidden = model(batch["input_ids"], **text_inputs(model, batch))
    mask = batch["attention_mask"][..., None].astype(hidden.dtype)
    pooled = (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def device_batches(
    batches: Iterable[Batch], keys: Sequence[str], mesh: Mesh | None = None
) -> list[dict[str, jax.Array]]:
    """Moves the given keys of each batch to the device once, for reuse at every level: to the
    default device, or on a mesh split along the first axis over all its devices (every host
    passes the same batches). ValueError when a batch's rows do not divide by the device count."""
    if mesh is None:
        return [{k: jnp.asarray(b[k]) for k in keys if k in b} for b in batches]
    placement = batch_sharding(mesh)
    out = []
    for b in batches:
        chosen = {k: b[k] for k in keys if k in b}
        rows = len(next(iter(chosen.values())))
        if rows % mesh.size:
            raise ValueError(
                f"a batch of {rows} rows does not split over the mesh's {mesh.size} devices; use "
                f"a batch size that is a multiple of {mesh.size}."
            )
        out.append(put(chosen, placement))
    return out


def _require_examples(batches: list[Batch], task: str) -> int:
    """The number of real (weight 1) rows; ValueError when there are none."""
    count = int(sum(np.sum(b["weights"]) for b in batches))
    if count == 0:
        raise ValueError(
            f"task {task!r}: the evaluation set is empty after filtering; check the data and the "
            "max_examples / max_length settings."
        )
    return count


def embeddings(forward: Forward, params: Any, batches: list[Batch], on_device: list) -> np.ndarray:
    """Embeddings of every real row: in the order of the rows' `index` (their positions in the
    texts, as `data.length_sorted_batches` gives them) where the batches have one, else in batch
    order."""
    outputs = [forward(params, batch) for batch in on_device]
    real = [b["weights"] > 0 for b in batches]
    rows = np.concatenate([np.asarray(out)[r] for out, r in zip(outputs, real, strict=True)])
    if "index" not in batches[0]:
        return rows
    ordered = np.empty_like(rows)
    ordered[np.concatenate([b["index"][r] for b, r in zip(batches, real, strict=True)])] = rows
    return ordered


def document_similarity(
    model: nnx.Module,
    batches: list[Batch],
    human: np.ndarray,
    task: str = "lee",
    mesh: Mesh | None = None,
) -> Evaluator:
    """Spearman x 100 of embedding cosines against a human similarity matrix (upper triangle)."""
    count = _require_examples(batches, task)
    if human.shape != (count, count):
        raise ValueError(
            f"task {task!r}: the human matrix has shape {human.shape} but there are {count} "
            "documents; they must match."
        )
    forward = make_forward(model, mean_pooled, mesh)
    on_device = device_batches(batches, TEXT_INPUTS, mesh)
    human_pairs = metrics.upper_triangle(human)

    def score(params: Any) -> float:
        vectors = embeddings(forward, params, batches, on_device)
        return metrics.spearman_x100(metrics.upper_triangle(vectors @ vectors.T), human_pairs)

    return Evaluator(task, "spearman", True, score, (forward,), len(human_pairs))


def word_pair_similarity(
    model: nnx.Module,
    batches: list[Batch],
    words: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    human: np.ndarray,
    task: str,
    mesh: Mesh | None = None,
) -> Evaluator:
    """Spearman x 100 of word-embedding cosines against human ratings of word pairs.

    `batches` hold the tokenised `words` (one row each, in order); `pairs` index into them by word.
    """
    count = _require_examples(batches, task)
    if count != len(words) or len(pairs) != len(human) or not pairs:
        raise ValueError(
            f"task {task!r}: {count} embedded rows for {len(words)} words and {len(pairs)} pairs "
            f"for {len(human)} ratings; need one row per word, one rating per pair, >= 1 pair."
        )
    index = {word: i for i, word in enumerate(words)}
    missing = sorted({w for pair in pairs for w in pair if w not in index})
    if missing:
        raise ValueError(f"task {task!r}: words {missing[:5]} of the pairs were not embedded.")
    left = np.array([index[a] for a, _ in pairs])
    right = np.array([index[b] for _, b in pairs])
    forward = make_forward(model, mean_pooled, mesh)
    on_device = device_batches(batches, TEXT_INPUTS, mesh)

    def score(params: Any) -> float:
        vectors = embeddings(forward, params, batches, on_device)
        cosines = np.sum(vectors[left] * vectors[right], axis=-1)
        return metrics.spearman_x100(cosines, np.asarray(human))

    return Evaluator(task, "spearman", True, score, (forward,), len(pairs))


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """The fp32 log-probability of each target token under its logits: (..., V), (...) -> (...)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def _token_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Summed negative log-likelihood of `targets` under `logits`, weighted; fp32."""
    return -(token_log_probs(logits, targets) * weights).sum()


def causal_lm_nll(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Summed next-token NLL and the number of predicted tokens of a causal LM batch."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].astype(jnp.float32) * batch["weights"][:, None]
    target_mask = mask[:, 1:] * mask[:, :-1]
    nll = _token_nll(logits[:, :-1], batch["input_ids"][:, 1:], target_mask)
    return nll, target_mask.sum()


def masked_lm_nll(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Summed NLL of the original tokens at the masked positions (`mlm_labels` >= 0)."""
    logits = model(batch["input_ids"], **text_inputs(model, batch))
    labels = batch["mlm_labels"]
    mask = (labels >= 0).astype(jnp.float32) * batch["weights"][:, None]
    return _token_nll(logits, jnp.maximum(labels, 0), mask), mask.sum()


class LossSpec(NamedTuple):
    """What an NLL evaluator computes: its task and metric name, the jitted (nll_sum,
    token_count) of a batch, and the batch keys it reads."""

    task: str
    metric: str
    apply: Apply
    keys: tuple[str, ...]


def _nll_evaluator(
    model: nnx.Module, batches: list[Batch], spec: LossSpec, mesh: Mesh | None
) -> Evaluator:
    """Perplexity or mean loss from a jitted (nll_sum, token_count) per batch."""
    task, metric = spec.task, spec.metric
    count = _require_examples(batches, task)
    forward = make_forward(model, spec.apply, mesh)
    on_device = device_batches(batches, (*spec.keys, "weights"), mesh)

    def score(params: Any) -> float:
        totals = [forward(params, batch) for batch in on_device]
        nll = float(sum(t[0] for t in totals))
        tokens = float(sum(t[1] for t in totals))
        loss = nll / tokens
        return float(np.exp(loss)) if metric == "perplexity" else loss

    return Evaluator(task, metric, False, score, (forward,), count)


def perplexity(
    model: nnx.Module, batches: list[Batch], task: str = "wikitext", mesh: Mesh | None = None
) -> Evaluator:
    """Perplexity (exp of mean next-token NLL) of a causal LM on fixed token blocks."""
    spec = LossSpec(task, "perplexity", causal_lm_nll, TEXT_INPUTS[:2])
    return _nll_evaluator(model, batches, spec, mesh)


def lm_loss(
    model: nnx.Module, batches: list[Batch], task: str = "wikitext", mesh: Mesh | None = None
) -> Evaluator:
    """Mean next-token NLL (nats per token) of a causal LM on fixed token blocks."""
    spec = LossSpec(task, "lm_loss", causal_lm_nll, TEXT_INPUTS[:2])
    return _nll_evaluator(model, batches, spec, mesh)


def mlm_loss(
    model: nnx.Module, batches: list[Batch], task: str = "wikitext_mlm", mesh: Mesh | None = None
) -> Evaluator:
    """Mean NLL at masked positions of a masked LM; batches carry fixed `mlm_labels`."""
    spec = LossSpec(task, "mlm_loss", masked_lm_nll, (*TEXT_INPUTS, "mlm_labels"))
    return _nll_evaluator(model, batches, spec, mesh)


def mask_tokens(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    mask_token_id: int,
    special_ids: Sequence[int],
    rate: float = 0.15,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Replaces a fixed random `rate` of ordinary tokens by the mask token; labels -1 elsewhere."""
    rng = np.random.default_rng(seed)
    eligible = (attention_mask > 0) & ~np.isin(input_ids, np.asarray(special_ids))
    chosen = eligible & (rng.random(input_ids.shape) < rate)
    labels = np.where(chosen, input_ids, -1)
    return np.where(chosen, mask_token_id, input_ids), labels


def classify(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
    """Predicted class of every row of a text or image classification batch."""
    if "pixel_values" in batch:
        logits = model(batch["pixel_values"])
    else:
        logits = model(batch["input_ids"], **text_inputs(model, batch))
    return jnp.argmax(logits, axis=-1)


def classification(
    model: nnx.Module,
    batches: list[Batch],
    task: str,
    metric: str = "accuracy",
    mesh: Mesh | None = None,
) -> Evaluator:
    """Accuracy or binary F1 (x 100) of a classifier; batches carry int `label`."""
    if metric not in ("accuracy", "f1"):
        raise ValueError(f"task {task!r}: metric must be accuracy or f1, not {metric!r}.")
    _require_examples(batches, task)
    forward = make_forward(model, classify, mesh)
    keys = (*TEXT_INPUTS, "pixel_values")
    on_device = device_batches(batches, keys, mesh)
    labels = np.concatenate([b["label"][b["weights"] > 0] for b in batches])

    def score(params: Any) -> float:
        predicted = np.concatenate(
            [
                np.asarray(forward(params, batch))[b["weights"] > 0]
                for batch, b in zip(on_device, batches, strict=True)
            ]
        )
        if metric == "f1":
            return metrics.binary_f1_x100(predicted, labels)
        return metrics.accuracy_x100(predicted, labels)

    return Evaluator(task, metric, True, score, (forward,), len(labels))


def span_logits(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Start and end logits of a question-answering model, each (B, L)."""
    return model(batch["input_ids"], **text_inputs(model, batch))


def question_answering(
    model: nnx.Module,
    batches: list[Batch],
    features: Sequence[dict[str, Any]],
    answers: dict[Any, Sequence[str]],
    task: str = "squad",
    metric: str = "f1",
    max_answer_length: int = 30,
    mesh: Mesh | None = None,
) -> Evaluator:
    """SQuAD F1 or exact match (x 100): best span per example over its features.

    `features[i]` describes the i-th real row of the batches: `example_id`, `context` (the text),
    `offsets` ((L, 2) character offsets, (0, 0) outside the context) and `context_mask` ((L,)).
    `answers[example_id]` lists the true answer texts.
    """
    if metric not in ("f1", "exact_match"):
        raise ValueError(f"task {task!r}: QA metric must be f1 or exact_match, not {metric!r}.")
    count = _require_examples(batches, task)
    if count != len(features):
        raise ValueError(f"task {task!r}: {count} real rows but {len(features)} feature records.")
    forward = make_forward(model, span_logits, mesh)
    on_device = device_batches(batches, TEXT_INPUTS, mesh)

    def score(params: Any) -> float:
        best: dict[Any, tuple[float, str]] = {}
        starts, ends = [], []
        for batch, b in zip(on_device, batches, strict=True):
            start, end = forward(params, batch)
            starts.append(np.asarray(start)[b["weights"] > 0])
            ends.append(np.asarray(end)[b["weights"] > 0])
        for feature, start, end in zip(
            features, np.concatenate(starts), np.concatenate(ends), strict=True
        ):
            i, j, value = metrics.best_span(start, end, feature["context_mask"], max_answer_length)
            text = feature["context"][feature["offsets"][i][0] : feature["offsets"][j][1]]
            if value > best.get(feature["example_id"], (-np.inf, ""))[0]:
                best[feature["example_id"]] = (value, text)
        ids = list(answers)
        predictions = [best.get(example_id, (0.0, ""))[1] for example_id in ids]
        return metrics.squad_scores(predictions, [answers[i] for i in ids])[metric]

    return Evaluator(task, metric, True, score, (forward,), len(answers))


def cls_features(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
    """The final [CLS] hidden state of an image backbone for NHWC `pixel_values`, (B, H)."""
    return model(batch["pixel_values"])[:, 0]


def knn_classification(
    model: nnx.Module,
    bank_batches: list[Batch],
    test_batches: list[Batch],
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    task: str,
    mesh: Mesh | None = None,
) -> Evaluator:
    """k-NN accuracy x 100 of an image backbone's [CLS] features (`es_jax.evaluate.knn`): each
    test image takes the temperature-weighted vote of its k nearest bank images. Both feature
    sets come from the parameters given at each call; batches carry `pixel_values` and `label`,
    all of one shape (one compilation)."""
    from es_jax.evaluate import knn

    _require_examples(bank_batches, task)
    count = _require_examples(test_batches, task)
    forward = make_forward(model, cls_features, mesh)
    bank_on_device = device_batches(bank_batches, ("pixel_values",), mesh)
    test_on_device = device_batches(test_batches, ("pixel_values",), mesh)
    bank_labels = np.concatenate([b["label"][b["weights"] > 0] for b in bank_batches])
    test_labels = np.concatenate([b["label"][b["weights"] > 0] for b in test_batches])

    def score(params: Any) -> float:
        bank = embeddings(forward, params, bank_batches, bank_on_device)
        test = embeddings(forward, params, test_batches, test_on_device)
        return knn.knn_accuracy(
            bank, bank_labels, test, test_labels, num_classes=num_classes, k=k,
            temperature=temperature,
        )

    return Evaluator(task, "accuracy", True, score, (forward,), count)
