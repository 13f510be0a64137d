"""Evaluation: jitted evaluators (similarity, perplexity, loss, accuracy, F1, SQuAD), the sweep.

`es_jax.evaluate.evaluators` builds one evaluator per task whose parameters are an argument, so a
sweep over sparsity levels compiles each evaluator once; `es_jax.evaluate.sweep` is the driver
behind `es-jax sweep` (imported on demand).
"""

from es_jax.evaluate import evaluators, metrics
from es_jax.evaluate.evaluators import Evaluator

__all__ = ["Evaluator", "evaluators", "metrics"]
