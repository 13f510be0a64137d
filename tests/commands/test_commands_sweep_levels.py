"""The sweep's levels on MiniLM's real weights: one uint8 per target weight whose level i is exactly
the mask `pruning.unstructured` (or `n_of_m`) gives on magnitude scores, |w| computed inside the
selection (no scores tree stored), layerwise and per-output selected one leaf at a time; and the
measured sparsity of a level, counted from the levels, equal to `pruning.report` on the pruned
copy."""

import jax
import numpy as np
import pytest

from es_jax import models, pruning
from es_jax.commands import sweep
from es_jax.commands import sweep_levels as methods
from es_jax.commands.sweep_config import parse_pattern
from es_jax.evaluate import evaluators

SPARSITIES = (0.3, 0.7)


@pytest.fixture(scope="module")
def minilm():
    """MiniLM's parameters, a few set to exactly 0 (weights a checkpoint already prunes), and
    the magnitude scores of its target set."""
    model, _ = models.load("minilm")
    _, params, _ = evaluators.split_params(model)
    kernel = params["encoder"]["layers"][0]["attention"]["query"]["kernel"]
    kernel[...] = kernel[...].at[:3].set(0.0)
    return params, models.bert.PRUNABLE


def sweep_levels(params, where, pattern):
    """The levels the sweep's magnitude scorer selects for `pattern`."""
    from es_jax.pruning.scores import map_targets

    scores = methods.Scores(map_targets(params, where, lambda _, __, leaf: leaf), jax.numpy.abs)
    return methods.levels_of(scores, parse_pattern(pattern), SPARSITIES)


def assert_masks_equal(found, expected):
    assert jax.tree.structure(found) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(found), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("scope", ["global", "layerwise", "per_output"])
def test_each_level_is_the_unstructured_mask_of_the_magnitudes(minilm, scope):
    params, where = minilm
    levels = sweep_levels(params, where, scope)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(levels)}
    assert dtypes == {np.dtype(np.uint8)}
    masks = pruning.unstructured(pruning.magnitude(params, where), list(SPARSITIES), scope=scope)
    for index, mask in enumerate(masks):
        assert_masks_equal(pruning.mask_at(levels, index), mask)


def test_an_n_of_m_pattern_is_one_level(minilm):
    params, where = minilm
    levels = sweep_levels(params, where, "2:4")
    assert {int(v) for leaf in jax.tree.leaves(levels) for v in np.unique(leaf)} == {0, 1}
    expected = pruning.n_of_m(pruning.magnitude(params, where), n=2, m=4)
    assert_masks_equal(pruning.mask_at(levels, 0), expected)


def test_measured_sparsity_equals_the_report_of_the_pruned_copy(minilm):
    params, where = minilm
    levels = sweep_levels(params, where, "global")
    for index in (sweep.DENSE, 0, 1):
        level = methods.Pruned(params, levels, index, 0.0)
        mask = methods.mask_of(level)
        pruned = params if mask is None else pruning.apply(params, mask)
        report = pruning.report(pruned, where=where)
        expected = (report["target"]["sparsity"], report["model"]["sparsity"])
        assert sweep.measured(level, None) == expected
    # the three zeros already in the weights count at every level, the dense one too
    dense = sweep.measured(methods.Pruned(params, levels, sweep.DENSE, 0.0), None)
    assert dense[0] > 0
