"""Fine-tuning and IMP on a 4x2 mesh of the 8 test CPU devices equal them on one device.

The BERT here is tiny but wide enough (hidden 64, FFN 128) that its kernels and embeddings reach
`mesh.FSDP_MIN_SIZE` and are really split along the mesh's `fsdp` axis; dropout is on.
"""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from tiny_classifier import classifier, learnable_batch

from es_jax import mesh as meshes
from es_jax import models, pruning
from es_jax.models import bert
from es_jax.train import finetune as ft
from es_jax.train import lottery

CONFIG = bert.config_from_hf({
    **models.TINY_HF_CONFIGS["bert"], "vocab_size": 64, "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "max_position_embeddings": 16,
})
SEQ_LEN, BATCH, STEPS = 8, 8, 3
FINETUNE = ft.finetune_config(learning_rate=5e-3, weight_decay=0.01)
# Adam divides each gradient by its own running scale, so an entry whose gradient is almost zero
# moves by up to the learning rate, and float rounding of that gradient (the mesh sums the batch
# in another order) changes its step by a small part of the learning rate: a few entries in 10^4
# differ by ~1e-3 of it after these steps, all others by under 1e-6.
RTOL, ATOL = 1e-4, 2e-3 * FINETUNE.learning_rate


model_fn = classifier(CONFIG)


def batch(seed, size=BATCH):
    """A batch of the task `model_fn` learns (`tiny_classifier.learnable_batch`)."""
    return learnable_batch(seed, size, CONFIG.vocab_size, SEQ_LEN)


TRAIN = [batch(seed) for seed in range(STEPS)]


@pytest.fixture(scope="module")
def mesh():
    """4 devices along `data`, 2 along `fsdp`."""
    return meshes.make_mesh(4, 2)


@pytest.fixture(scope="module")
def mask():
    """A 50% global magnitude mask of the seed-0 model's BERT targets (single device)."""
    params = nnx.state(model_fn(nnx.Rngs(0)), nnx.Param)
    return pruning.unstructured(pruning.magnitude(params, where=bert.PRUNABLE), 0.5)


@pytest.fixture(scope="module")
def runs(mesh, mask):
    """The same masked fine-tuning on one device and on the mesh: ((model, losses), ...)."""
    return (ft.finetune(model_fn, mask, TRAIN, FINETUNE, seed=0),
            ft.finetune(model_fn, mask, TRAIN, FINETUNE, seed=0, mesh=mesh))


def params_of(model):
    """The model's parameter arrays by path, as numpy."""
    params = nnx.state(model, nnx.Param)
    return dict(zip(pruning.leaf_paths(params), map(np.asarray, jax.tree.leaves(params)),
                    strict=True))


def assert_close_params(got, want):
    """Same paths, values equal to float tolerance, and exactly the same zero entries."""
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=RTOL, atol=ATOL, err_msg=path)
        np.testing.assert_array_equal(got[path] == 0, want[path] == 0, err_msg=path)


def test_mesh_finetuning_equals_one_device(runs, mask):
    (single, single_losses), (sharded, sharded_losses) = runs
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=RTOL)
    assert_close_params(params_of(sharded), params_of(single))
    assert not np.allclose(sharded_losses[0], sharded_losses[-1])  # it trained
    pruned = np.concatenate([~np.asarray(m).ravel() for m in jax.tree.leaves(mask)])
    weights = params_of(sharded)
    targets = np.concatenate([weights[p].ravel() for p in pruning.leaf_paths(mask)])
    assert np.all(targets[pruned] == 0)  # the mask held exactly on the mesh


def test_mesh_parameters_are_sharded_by_the_shared_rule(runs, mesh):
    _, (sharded, _) = runs
    params = nnx.state(sharded, nnx.Param)
    split = []
    for path, leaf in zip(pruning.leaf_paths(params), jax.tree.leaves(params), strict=True):
        spec = meshes.leaf_spec(leaf.shape, 2)
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), path
        split += [path] if meshes.FSDP_AXIS in spec else []
    assert "bert/encoder/layers/0/mlp/up/kernel" in split  # 64 x 128: sharded along its 128
    assert "bert/embeddings/word_embeddings/embedding" in split


def test_other_masks_on_the_mesh_compile_nothing_new(runs, mesh, mask):
    compiles = []

    def record(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    denser = jax.tree.map(lambda keep: keep | ~keep, mask)  # every target weight kept
    jax.monitoring.register_event_duration_secs_listener(record)
    try:
        model, _ = ft.finetune(model_fn, denser, TRAIN, FINETUNE, seed=0, mesh=mesh)
    finally:
        jax.monitoring.unregister_event_duration_listener(record)
    assert compiles == []
    assert all(np.all(leaf != 0) for path, leaf in params_of(model).items() if "kernel" in path)


def test_batch_that_does_not_split_over_the_devices_is_refused(mesh):
    message = ("batch of 6 rows does not split over the mesh's 8 devices on this host; set the "
               "fine-tuning batch_size to a multiple of 8")
    with pytest.raises(ValueError, match=message):
        ft.finetune(model_fn, None, [batch(0, size=6)], FINETUNE, seed=0, mesh=mesh)


IMP = lottery.ImpConfig(FINETUNE, (0.3, 0.6), where=bert.PRUNABLE, rewind_step=1)
HELD_OUT = batch(100, size=16)


def evaluate(params):
    """The held-out loss of a classifier with these parameters."""
    model = model_fn(nnx.Rngs(0))
    nnx.update(model, params)
    model.eval()
    return float(ft.batch_loss(model, HELD_OUT, "classification"))


@pytest.fixture(scope="module")
def imp_directory(tmp_path_factory):
    """Where the mesh's IMP run keeps its rounds."""
    return tmp_path_factory.mktemp("imp") / "mesh"


@pytest.fixture(scope="module")
def imp_runs(mesh, imp_directory):
    """IMP (rewinding to step 1) on one device and, checkpointed, on the mesh."""
    return (lottery.imp(model_fn, TRAIN, IMP, evaluate),
            lottery.imp(model_fn, TRAIN, IMP, evaluate, imp_directory, mesh=mesh))


def test_mesh_imp_equals_one_device(imp_runs):
    single, sharded = imp_runs
    assert [(r.index, r.sparsity) for r in sharded] == [(r.index, r.sparsity) for r in single]
    for got, want in zip(sharded, single, strict=True):
        assert jax.tree.structure(got.mask) == jax.tree.structure(want.mask)
        for a, b in zip(jax.tree.leaves(got.mask), jax.tree.leaves(want.mask), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert got.metric == pytest.approx(want.metric, rel=RTOL)
        np.testing.assert_allclose(got.losses, want.losses, rtol=RTOL)
    kept = [np.mean(np.concatenate([np.asarray(m).ravel() for m in jax.tree.leaves(r.mask)]))
            for r in sharded]
    assert kept == pytest.approx([1.0, 0.7, 0.4], abs=1e-4)


def assert_sharded_like_params(rounds, mesh):
    """Every mask leaf of every round placed by the shared rule for its shape."""
    for r in rounds:
        for path, leaf in zip(pruning.leaf_paths(r.mask), jax.tree.leaves(r.mask), strict=True):
            spec = meshes.leaf_spec(leaf.shape, 2)
            assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), path


def test_mesh_imp_masks_are_sharded_like_the_parameters(imp_runs, mesh):
    assert_sharded_like_params(imp_runs[1], mesh)


def test_mesh_imp_rounds_are_read_back_sharded(imp_runs, imp_directory, mesh, monkeypatch):
    _, sharded = imp_runs
    monkeypatch.setattr(ft, "finetune", None)  # a finished run trains nothing
    again = lottery.imp(model_fn, TRAIN, IMP, evaluate, imp_directory, mesh=mesh)
    assert [r.metric for r in again] == [r.metric for r in sharded]
    for got, want in zip(again, sharded, strict=True):
        for a, b in zip(jax.tree.leaves(got.mask), jax.tree.leaves(want.mask), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_sharded_like_params(again, mesh)
