"""Essential sparsity by the paper's rule, the knee, epsilon and refinement levels."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from es_jax.analysis import essential

GRID = [round(0.1 * i, 1) for i in range(10)]


def test_essential_is_last_level_before_first_crossing():
    drops = [0.0, 0.1, 0.3, 0.2, 0.9, 1.5, 0.5, 3.0, 8.0, 20.0]
    assert essential.essential_sparsity(GRID, drops, tolerance=1.0) == 0.4


def test_a_later_recovery_does_not_extend_essential_sparsity():
    drops = [0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert essential.essential_sparsity(GRID, drops, tolerance=1.0) == 0.0


def test_all_levels_within_tolerance_gives_the_top_of_the_grid():
    assert essential.essential_sparsity(GRID, [0.5] * 10, tolerance=1.0) == 0.9


def test_improvements_count_as_within_tolerance():
    drops = [0.0, -3.0, -1.0, 2.0] + [5.0] * 6
    assert essential.essential_sparsity(GRID, drops, tolerance=1.0) == 0.2


def test_nan_level_counts_as_a_crossing():
    drops = [0.0, 0.1, math.nan, 0.0] + [0.0] * 6
    assert essential.essential_sparsity(GRID, drops, tolerance=1.0) == 0.1


def test_unsorted_levels_are_sorted_first():
    s = [0.3, 0.0, 0.2, 0.1]
    d = [5.0, 0.0, 0.2, 0.1]
    assert essential.essential_sparsity(s, d, tolerance=1.0) == 0.2


def test_sparsity_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        essential.essential_sparsity([0.0, 1.5], [0.0, 0.0], tolerance=1.0)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="equal length"):
        essential.essential_sparsity([0.0, 0.1], [0.0], tolerance=1.0)


def test_drop_is_positive_when_worse_in_both_directions():
    assert essential.drop(80.0, 82.0, higher_is_better=True) == 2.0
    assert essential.drop(21.0, 20.0, higher_is_better=False) == 1.0
    assert essential.drop(84.0, 82.0, higher_is_better=True) == -2.0


def test_default_epsilon_is_one_point_or_one_percent_relative():
    accuracy = essential.default_epsilon("accuracy")
    perplexity = essential.default_epsilon("perplexity")
    assert (accuracy.value, accuracy.relative) == (1.0, False)
    assert (perplexity.value, perplexity.relative) == (0.01, True)
    assert accuracy.tolerance(85.0) == 1.0
    assert perplexity.tolerance(20.0) == pytest.approx(0.2)


def test_negative_epsilon_is_refused():
    with pytest.raises(ValueError, match="epsilon"):
        essential.Epsilon(-1.0)


def test_knee_of_flat_then_steep_curve_is_where_it_turns():
    drops = [0.0, 0.0, 0.1, 0.0, 0.2, 0.3, 1.0, 5.0, 20.0, 50.0]
    assert essential.knee(GRID, drops, tolerance=1.0) == 0.7


def test_knee_of_a_curve_without_drop_is_none():
    assert essential.knee(GRID, [0.1] * 10, tolerance=1.0) is None


def test_refinement_levels_fill_the_gap_above_essential():
    levels = essential.refinement_levels(GRID, 0.4, 4)
    np.testing.assert_allclose(levels, [0.42, 0.44, 0.46, 0.48])
    assert essential.refinement_levels(GRID, 0.9, 4) == []


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=0, max_size=12), st.floats(0, 3))
def test_essential_levels_are_all_within_tolerance(later_drops, tolerance):
    drops = [0.0, *later_drops]  # the first level is dense
    sparsities = [i / 20 for i in range(len(drops))]
    found = essential.essential_sparsity(sparsities, drops, tolerance)
    assert all(d <= tolerance for s, d in zip(sparsities, drops, strict=True) if s <= found)
    above = [d for s, d in zip(sparsities, drops, strict=True) if s > found]
    if above:
        assert above[0] > tolerance


def test_seed_spread_is_the_mean_and_sample_std():
    spread = essential.seed_spread([70.0, 72.0, 77.0])
    assert spread.mean == pytest.approx(73.0)
    assert spread.std == pytest.approx(math.sqrt((9 + 1 + 16) / 2))  # ddof 1
    assert essential.seed_spread([70.0]) == (70.0, 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        essential.seed_spread([])


def test_a_drop_counts_only_beyond_epsilon_and_the_seed_spread():
    noise = essential.seed_noise(3.0, 4.0)
    assert noise == 5.0
    assert not essential.beyond_noise(4.9, 1.0, noise)
    assert essential.beyond_noise(5.1, 1.0, noise)
    assert not essential.beyond_noise(0.9, 1.0, 0.0)
    assert essential.beyond_noise(math.nan, 1.0, noise)


def test_noise_aware_essential_sparsity_lets_drops_within_the_spread_pass():
    drops = [0.0, 0.5, 2.0, 3.0, 9.0]
    noises = [1.0, 1.0, 2.5, 2.0, 2.0]
    grid = [0.0, 0.1, 0.2, 0.3, 0.4]
    assert essential.essential_sparsity(grid, drops, 1.0) == 0.1
    assert essential.noise_aware_essential_sparsity(grid, drops, 1.0, noises) == 0.2
    shuffled = [4, 2, 0, 3, 1]  # levels given in any order keep their own noise
    assert essential.noise_aware_essential_sparsity(
        [grid[i] for i in shuffled], [drops[i] for i in shuffled], 1.0,
        [noises[i] for i in shuffled]) == 0.2
    with pytest.raises(ValueError, match="one value per level"):
        essential.noise_aware_essential_sparsity(grid, drops, 1.0, noises[:2])


@given(st.lists(st.tuples(st.floats(-5, 5, allow_nan=False), st.floats(0, 4)), min_size=0,
                max_size=12), st.floats(0, 3), st.floats(0, 4))
def test_noise_aware_is_never_below_the_papers_and_equal_without_noise(later, tolerance, noise):
    levels = [(0.0, noise), *later]  # the first level is dense
    sparsities = [i / 20 for i in range(len(levels))]
    drops = [d for d, _ in levels]
    noises = [n for _, n in levels]
    paper = essential.essential_sparsity(sparsities, drops, tolerance)
    aware = essential.noise_aware_essential_sparsity(sparsities, drops, tolerance, noises)
    assert aware >= paper
    assert essential.noise_aware_essential_sparsity(
        sparsities, drops, tolerance, [0.0] * len(drops)) == paper
    assert all(not essential.beyond_noise(d, tolerance, n)
               for s, d, n in zip(sparsities, drops, noises, strict=True) if s <= aware)
