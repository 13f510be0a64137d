"""The sweep on a device mesh and in a parameter dtype: a tiny sweep on a 4x2 mesh of the 8 host
devices (parameters and level arrays FSDP-sharded, batches split over every device) gives the
single-device values to float tolerance and the same levels and measured sparsities exactly;
`dtype` loads the weights in that dtype and enters the fingerprint; batch sizes that cannot be
split over the devices, and bad mesh shapes, are refused before any work."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh

from es_jax import mesh, models
from es_jax.commands import sweep, sweep_config, sweep_levels
from es_jax.commands import sweep_results as results

# Wide enough that the target kernels (64x64, 64x128) reach es_jax.mesh.FSDP_MIN_SIZE and shard.
WIDE = {"hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 64}
TINY_BERT = {**models.TINY_HF_CONFIGS["bert"], **WIDE}
TINY_LLAMA = {**models.TINY_HF_CONFIGS["llama"], **WIDE}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def mesh_config(data_dir: str) -> ml_collections.ConfigDict:
    """Tiny BERT's MLM loss (magnitude, global and 2:4) and tiny Llama perplexity (Wanda, global;
    SparseGPT, layerwise) on Wikipedia text at 0, 0.5 and 0.9, on a 4x2 mesh (metrics that move
    smoothly with the weights, so float tolerance compares them)."""
    config = sweep_config.default_config()
    config.grid = (0.0, 0.5, 0.9)
    config.data_dir = data_dir
    config.mesh.data, config.mesh.fsdp = 4, 2
    config.models = ml_collections.ConfigDict()
    config.models.bert = sweep_config.model_settings(
        tiny=TINY_BERT, tasks=("wikitext_mlm",), scorers=("magnitude",),
        patterns=("global", "2:4"), lm_length=32, lm_blocks=8, batch_size=8,
    )
    llama = dict(tiny=TINY_LLAMA, tasks=("wikitext",), lm_length=32, lm_blocks=8, batch_size=8,
                 calibration_blocks=2, calibration_length=32, sparsegpt_block_size=16)
    config.models.llama = sweep_config.model_settings(
        scorers=("wanda",), patterns=("global",), **llama
    )
    config.models.sparsegpt = sweep_config.model_settings(
        scorers=("sparsegpt",), patterns=("layerwise",), **llama
    )
    return config


class Recorded:
    """What a sweep computed on the way: every levels tree as numpy (by call order) and the
    shardings of each model's parameters."""

    def __init__(self, monkeypatch):
        self.levels, self.shardings = [], {}
        levels_of, prepare = sweep_levels.levels_of, sweep.prepare

        def record_levels(*args):
            tree = levels_of(*args)
            self.levels.append([np.asarray(x) for x in jax.tree.leaves(tree)])
            return tree

        def record_prepare(key, *args):
            prepared = prepare(key, *args)
            self.shardings[key] = [x.sharding for x in jax.tree.leaves(prepared.params)]
            return prepared

        monkeypatch.setattr(sweep_levels, "levels_of", record_levels)
        monkeypatch.setattr(sweep, "prepare", record_prepare)


def run_recorded(config, workdir, monkeypatch, device_mesh=None) -> tuple[dict, Recorded]:
    """The sweep's results and what it computed; on `device_mesh` instead of config.mesh's."""
    with monkeypatch.context() as patch:
        if device_mesh is not None:
            patch.setattr(sweep, "sweep_mesh", lambda config: device_mesh)
        recorded = Recorded(patch)
        found = sweep.run(config, workdir, progress=False)
    return found, recorded


@pytest.fixture(scope="module")
def both(tmp_path_factory, data_dir):
    """The mesh sweep on one device, then on the 4x2 mesh: ((results, recorded), ...)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        single = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), mesh.MESH_AXES)
        config = mesh_config(data_dir)
        reference = run_recorded(config, tmp_path_factory.mktemp("one"), monkeypatch, single)
        sharded = run_recorded(config, tmp_path_factory.mktemp("mesh"), monkeypatch)
    return reference, sharded


def test_the_4x2_mesh_shards_parameters_over_fsdp_and_one_device_holds_them_whole(both):
    (_, one), (_, on_mesh) = both
    for key in ("bert", "llama", "sparsegpt"):
        assert all(s.device_set == {jax.devices()[0]} for s in one.shardings[key])
        specs = {tuple(s.spec) for s in on_mesh.shardings[key]}
        assert (None, mesh.FSDP_AXIS) in specs or (mesh.FSDP_AXIS, None) in specs
        assert all(len(s.device_set) == 8 for s in on_mesh.shardings[key])


def test_levels_on_the_mesh_equal_the_single_device_levels_exactly(both):
    (_, one), (_, on_mesh) = both
    assert len(one.levels) == len(on_mesh.levels) == 3  # global + 2:4 magnitude, global Wanda
    for reference, sharded in zip(one.levels, on_mesh.levels, strict=True):
        assert len(reference) == len(sharded) > 0
        for a, b in zip(reference, sharded, strict=True):
            np.testing.assert_array_equal(a, b)


def test_values_on_the_mesh_equal_the_single_device_values(both):
    (reference, _), (sharded, _) = both
    runs = {run["id"]: run for run in sharded["runs"]}
    assert set(runs) == {run["id"] for run in reference["runs"]}
    for run in reference["runs"]:
        other = runs[run["id"]]
        assert other["dense"] == pytest.approx(run["dense"], rel=1e-4)
        assert len(other["levels"]) == len(run["levels"])
        for level, found in zip(run["levels"], other["levels"], strict=True):
            assert found["sparsity"] == level["sparsity"]
            assert found["measured_sparsity"] == level["measured_sparsity"]
            assert found["model_sparsity"] == level["model_sparsity"]
            assert found["value"] == pytest.approx(level["value"], rel=1e-4)
    assert sharded["compilations"] == reference["compilations"]
    assert set(sharded["compilations"].values()) == {1}


def test_measured_sparsity_counts_the_levels_and_the_zeros_already_there(both):
    (reference, _), _ = both
    for run in reference["runs"]:
        for level in run["levels"]:
            assert level["measured_sparsity"] == pytest.approx(level["sparsity"], abs=2e-3)
            assert level["model_sparsity"] < level["measured_sparsity"] or level["sparsity"] == 0


def test_a_bfloat16_entry_loads_bfloat16_weights():
    settings = sweep_config.model_settings(tiny=TINY_LLAMA, tasks=("wikitext",), dtype="bfloat16")
    model, _ = sweep.load_model(settings, "causal_lm", seed=0)
    dtypes = {x.dtype for x in jax.tree.leaves(sweep.split_params(model)[1])}
    assert dtypes == {np.dtype(jax.numpy.bfloat16)}
    settings = sweep_config.model_settings(tiny=TINY_BERT, tasks=("glue/sst2",), dtype="bfloat16")
    model, _ = sweep.load_model(settings, "classification", seed=0, num_labels=2)  # a new head
    dtypes = {x.dtype for x in jax.tree.leaves(sweep.split_params(model)[1])}
    assert dtypes == {np.dtype(jax.numpy.bfloat16)}


def test_the_dtype_enters_the_fingerprint_only_when_not_float32(data_dir):
    config = mesh_config(data_dir)
    settings = config.models.bert
    before = results.fingerprint("bert", settings, config)
    without = settings.to_dict()
    del without["dtype"]
    assert before == results.fingerprint("bert", ml_collections.ConfigDict(without), config)
    settings.dtype = "bfloat16"
    assert results.fingerprint("bert", settings, config) != before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: setattr(c.models.bert, "batch_size", 4),
         r"models.bert.batch_size=4 does not split over the 8 devices of config.mesh"),
        (lambda c: setattr(c.mesh, "data", 3), "config.mesh: data=3 x fsdp=2"),
        (lambda c: setattr(c.models.bert, "dtype", "int8"), r"models.bert.dtype='int8'; use one"),
        (lambda c: setattr(c.models, "bert", sweep_config.model_settings(
            name="checkpoint:/no/run", tasks=("wikitext_mlm",), dtype="bfloat16")),
         "a checkpoint: entry loads its run's float32 weights"),
    ],
)
def test_what_cannot_run_on_the_mesh_or_in_the_dtype_is_refused(tmp_path, data_dir, change,
                                                                 message):
    config = mesh_config(data_dir)
    change(config)
    with pytest.raises(ValueError, match=message):
        sweep.run(config, tmp_path, progress=False)
    assert not (tmp_path / "results.json").exists()
