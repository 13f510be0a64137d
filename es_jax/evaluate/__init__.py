"""Evaluation: jitted evaluators (similarity, perplexity, loss, accuracy, F1, SQuAD), the sweep.

`es_jax.evaluate.evaluators` builds one evaluator per task whose parameters are an argument, so a
sweep over sparsity levels compiles each evaluator once; `es_jax.evaluate.sweep` is the driver
behind `es-jax sweep` (imported on demand), with its configuration and validation in
`es_jax.evaluate.sweep_config` and its results store, CSV and tables in `es_jax.evaluate.results`.
"""

from es_jax.evaluate import evaluators, metrics
from es_jax.evaluate.evaluators import Evaluator

__all__ = ["Evaluator", "evaluators", "metrics"]
