"""How the exact selection reads many arrays: small arrays in chunks, large ones one at a time,
one program per number of levels, and a program that grows by a few ops per matrix. Masks are
checked against a numpy reference of the removal order (ties by leaf, then flat index)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from es_jax import mesh, pruning

# The modules, not the functions the package exports under the same names.
select = importlib.import_module("es_jax.pruning.select")
masks = importlib.import_module("es_jax.pruning.masks")

LEVELS = [0.05, 0.3, 0.5, 0.77, 1.0]
# With `tiny_chunks`: 10 small float32 arrays in 5 chunks of 2, 3 small bfloat16 ones (a group
# of their own) in one chunk, and 5 large arrays (over 24 scores) read one at a time.
SHAPES = ([(4, 6)] * 10 + [(3, 8)] * 3 + [(5, 7)] * 4 + [(6, 6)])
DTYPES = [jnp.float32] * 10 + [jnp.bfloat16] * 3 + [jnp.float32] * 5
# Llama's seven matrices of a block (q, k, v, o, gate, up, down), small.
BLOCK = [(16, 16), (16, 4), (16, 4), (16, 16), (16, 44), (16, 44), (44, 16)]


@pytest.fixture
def tiny_chunks(monkeypatch: pytest.MonkeyPatch):
    """Chunks of at most 96 scores, and arrays of more than 24 scores read one at a time, so
    tiny arrays take every path. The constants are read when a program is traced, so the caches
    are cleared before and after."""
    jax.clear_caches()
    monkeypatch.setattr(select, "SMALL_SCORES", 24)
    monkeypatch.setattr(select, "CHUNK_SCORES", 96)
    yield
    jax.clear_caches()


def tied_tree(seed: int, signed: bool) -> dict[str, jax.Array]:
    """Arrays of SHAPES and DTYPES holding a few distinct values (ties everywhere)."""
    rng = np.random.default_rng(seed)
    low = -4 if signed else 0
    return {f"w{i:02d}": jnp.asarray(rng.integers(low, 5, shape) / 2, dtype)
            for i, (shape, dtype) in enumerate(zip(SHAPES, DTYPES, strict=True))}


def kept_levels(tree: dict[str, jax.Array], levels: list[float]) -> np.ndarray:
    """Reference: for every weight in leaf order, how many levels keep it, where level s removes
    the round(s * n) lowest scores, ties by leaf order, then flat index."""
    flat = np.concatenate([np.asarray(w, np.float32).ravel() for w in tree.values()])
    rank = np.empty(flat.size, np.int64)
    rank[np.lexsort((np.arange(flat.size), flat))] = np.arange(flat.size)
    return sum((rank >= round(s * flat.size)).astype(np.int64) for s in levels)


def flat(tree: dict) -> np.ndarray:
    """The leaves of a tree (in order) flattened and concatenated."""
    return np.concatenate([np.asarray(leaf).ravel() for leaf in tree.values()])


@pytest.mark.usefixtures("tiny_chunks")
@pytest.mark.parametrize("signed", [False, True], ids=["counted per leaf", "counted per key"])
def test_every_read_path_gives_the_reference_masks_eagerly_and_under_jit(signed):
    tree = tied_tree(0, signed)
    plan = select.chunk_plan(select.Leaves(list(tree.values())))
    assert sorted(len(chunks) for chunks in plan) == [1, 1, 4, 5]  # the paths described above
    if signed:  # too wide a range for per-leaf counts: the ties are counted in one more pass
        scores = select.Leaves(list(tree.values()))
        total = scores.total
        ks = jnp.asarray([max(1, round(s * total)) for s in LEVELS], jnp.uint32)
        _, shift = select._sampled_range(select._sample(scores, 4 * total), total, ks)
        assert int(shift) > select._fine_keys_per_slot(len(LEVELS), len(tree)).bit_length() - 1
    jitted = jax.jit(lambda t: pruning.levels(t, LEVELS))
    for seed in range(3):
        tree = tied_tree(seed, signed)
        expected = kept_levels(tree, LEVELS)
        np.testing.assert_array_equal(flat(pruning.levels(tree, LEVELS)), expected)
        np.testing.assert_array_equal(flat(jitted(tree)), expected)
        for level, mask in enumerate(pruning.unstructured(tree, LEVELS)):
            np.testing.assert_array_equal(flat(mask), expected > level)


@pytest.mark.usefixtures("tiny_chunks")
def test_omp_zeroes_what_the_reference_removes():
    tree = tied_tree(1, signed=True)
    expected = kept_levels({k: jnp.abs(w) for k, w in tree.items()}, LEVELS)
    pruned, kept = pruning.omp(tree, LEVELS, where=".*")
    for level in range(len(LEVELS)):
        np.testing.assert_array_equal(flat(kept[level]), expected > level)
        np.testing.assert_array_equal(flat(pruned[level]),
                                      np.where(expected > level, flat(tree), 0))
        assert all(p.dtype == w.dtype for p, w in zip(pruned[level].values(), tree.values(),
                                                       strict=True))


def lowered_ops(matrices: int) -> int:
    """Ops in the lowered program that `pruning.levels` runs (eagerly) for `matrices` matrices
    of BLOCK's shapes at five levels."""
    arrays = [jnp.ones(BLOCK[i % len(BLOCK)]) for i in range(matrices)]
    counts = masks._removal_counts(arrays, LEVELS, "global")
    program = masks._levels_arrays.lower(arrays, counts, select.group_rows(arrays), "global",
                                         jnp.abs)
    return program.as_text().count(" = ")


def test_the_program_grows_by_a_few_ops_per_matrix():
    # Code repeated for every matrix (about 400 ops each before the passes looped over groups)
    # is what made compile time grow with the number of matrices.
    per_matrix = (lowered_ops(70) - lowered_ops(14)) / 56
    assert per_matrix <= 40, per_matrix


def test_an_eager_call_at_other_sparsities_compiles_nothing_new():
    tree = {f"w{i}": jnp.asarray(np.random.default_rng(i).normal(size=s), jnp.float32)
            for i, s in enumerate(BLOCK)}
    pruning.omp(tree, [0.2, 0.6])
    pruning.levels(tree, [0.2, 0.6])
    compiled = (masks._levels_arrays._cache_size(), masks._pruned_at._cache_size())
    _, kept = pruning.omp(tree, [0.35, 0.9])
    pruning.levels(tree, [0.35, 0.9])
    assert (masks._levels_arrays._cache_size(), masks._pruned_at._cache_size()) == compiled
    expected = kept_levels({k: jnp.abs(w) for k, w in tree.items()}, [0.35, 0.9])
    np.testing.assert_array_equal(flat(kept[1]), expected > 1)


@pytest.mark.parametrize("small", [4096, 24], ids=["chunks of two", "one at a time"])
def test_eager_masks_of_sharded_parameters_equal_the_plain_ones_and_stay_sharded(
        small, monkeypatch):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host CPU devices"
    jax.clear_caches()
    monkeypatch.setattr(select, "SMALL_SCORES", small)
    monkeypatch.setattr(select, "CHUNK_SCORES", 2 * small)
    rng = np.random.default_rng(2)
    params = {f"layer{i}": {"q": jnp.asarray(rng.integers(-9, 9, (64, 64)) / 4, jnp.float32),
                            "bias": jnp.zeros(64)} for i in range(6)}
    sharded = mesh.shard(params, mesh.make_mesh(4, 2))
    pruned, kept = pruning.omp(sharded, [0.3, 0.6], where=".*/q")
    plain_pruned, plain_kept = pruning.omp(params, [0.3, 0.6], where=".*/q")
    jax.tree.map(np.testing.assert_array_equal, kept, plain_kept)
    jax.tree.map(np.testing.assert_array_equal, pruned, plain_pruned)
    assert len(kept[0]["layer3"]["q"].sharding.device_set) == 8
    levels = pruning.levels(pruning.magnitude(sharded, ".*/q"), [0.3, 0.6])
    assert len(levels["layer3"]["q"].sharding.device_set) == 8
    jax.tree.map(np.testing.assert_array_equal, pruning.mask_at(levels, 1), plain_kept[1])
    jax.clear_caches()


@pytest.mark.parametrize("bad", [3, 4], ids=["a small leaf among its group", "a large leaf"])
def test_the_refusal_of_non_finite_weights_names_the_right_leaf(bad):
    # Small leaves of one shape are checked together as the rows of one array, out of order.
    rng = np.random.default_rng(3)
    small, large = (4, 6), (300, 300)
    shapes = [small, large, small, small, large, small, small]
    params = {f"w{i}": rng.normal(size=shape).astype(np.float32) for i, shape in enumerate(shapes)}
    params[f"w{bad}"][1, 2] = np.nan
    with pytest.raises(ValueError, match=f"leaf 'w{bad}' contains NaN or inf"):
        pruning.omp(params, 0.5)
    with pytest.raises(ValueError, match=f"leaf 'w{bad}' contains NaN or inf scores"):
        pruning.levels(params, [0.5])
