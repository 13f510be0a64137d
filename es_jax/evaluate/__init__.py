"""Evaluation: jitted evaluators (similarity, perplexity, loss, accuracy, F1, SQuAD) and tasks.

`es_jax.evaluate.evaluators` builds one evaluator per task whose parameters are an argument, so a
sweep over sparsity levels compiles each evaluator once; `es_jax.evaluate.tasks` names the tasks
a sweep can evaluate and builds their evaluators; `es_jax.evaluate.multiple_choice` scores
multiple-choice questions (MMLU) by each choice's log-likelihood (imported on use: it reads data).
The sweep itself is `es_jax.commands.sweep`.
"""

from es_jax.evaluate import evaluators, metrics
from es_jax.evaluate.evaluators import Evaluator

__all__ = ["Evaluator", "evaluators", "metrics"]
