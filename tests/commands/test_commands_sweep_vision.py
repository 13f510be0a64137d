"""The sweep's vision side: pixels normalised as the model's preprocessor says (a folder with a
preprocessor_config.json), pre-training runs as model entries ("checkpoint:RUN_DIR[@STEP]": their
backbone, a new seeded head, the step recorded, a missing run or step refused up front), and the
`:tiny` variant of a config with the Fashion-MNIST tasks running end to end."""

import hashlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from es_jax import models, pruning
from es_jax.commands import pretrain_config, sweep, sweep_config
from es_jax.commands import sweep_results as results
from es_jax.evaluate import tasks
from es_jax.models import vit
from es_jax.train import checkpointing, vision

IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
FINETUNE = {"total_steps": 2, "batch_size": 4, "num_epochs": 1}


def flat(model) -> dict[str, np.ndarray]:
    """A model's parameters by '/'-joined path."""
    state = nnx.state(model, nnx.Param)
    return {p: np.asarray(x) for p, x in zip(pruning.leaf_paths(state), jax.tree.leaves(state),
                                             strict=True)}


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """A Hugging Face ViT folder (a tiny random ViTModel) whose preprocessor asks for ImageNet
    mean and std."""
    folder = tmp_path_factory.mktemp("vit_folder")
    model = vit.build(vit.config_from_hf(models.TINY_HF_CONFIGS["vit"]), None,
                      rngs=nnx.Rngs(0))
    models.export(model, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True,
                                                                 **IMAGENET}))
    return folder


def folder_entry(folder, tasks_=("digits",)) -> ml_collections.ConfigDict:
    return sweep_config.model_settings(name=str(folder), tasks=tasks_, image_size=32,
                                       max_examples=8, batch_size=4, finetune=FINETUNE)


def test_a_folders_preprocessor_sets_the_pixel_normalisation(hub_folder):
    expected = tasks.Normalisation(tuple(IMAGENET["image_mean"]), tuple(IMAGENET["image_std"]))
    assert sweep_config.image_normalisation(folder_entry(hub_folder)) == expected
    config = sweep_config.default_config()
    knn = folder_entry(hub_folder, ("digits_knn",))
    assert sweep.task_settings(config, knn).normalisation == expected
    tiny = sweep_config.model_settings(tiny=models.TINY_HF_CONFIGS["vit"], tasks=("digits",))
    assert sweep_config.image_normalisation(tiny) == tasks.UNIT_RANGE
    text = sweep_config.model_settings(name="minilm", tasks=("lee",))
    assert sweep_config.image_normalisation(text) == tasks.UNIT_RANGE


def test_fine_tune_batches_carry_the_preprocessors_normalisation(hub_folder):
    setup = sweep.finetune_setup(folder_entry(hub_folder), "digits", 0, "")
    imagenet = tasks.Normalisation(tuple(IMAGENET["image_mean"]), tuple(IMAGENET["image_std"]))
    settings = tasks.FinetuneSettings(seed=0, batch_size=4, train_batch_size=4, num_epochs=1,
                                      image_size=32, max_examples=8)
    expected = tasks.build_finetune("digits", setup.model, None,
                                    settings.__class__(**{**settings.__dict__,
                                                          "normalisation": imagenet}))
    unit = tasks.build_finetune("digits", setup.model, None, settings)
    got = setup.data.train[0]["pixel_values"]
    np.testing.assert_array_equal(got, expected.train[0]["pixel_values"])
    assert not np.allclose(got, unit.train[0]["pixel_values"])


@pytest.mark.parametrize(
    ("preprocessor", "expected"),
    [
        ({"do_normalize": False, **IMAGENET}, tasks.Normalisation((0.0,), (1.0,))),
        ({"image_mean": 0.5, "image_std": 0.25}, tasks.Normalisation((0.5,), (0.25,))),
        ({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}, tasks.UNIT_RANGE),
        (None, tasks.UNIT_RANGE),
    ],
)
def test_what_a_preprocessor_config_says_is_read_exactly(tmp_path, preprocessor, expected):
    if preprocessor is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    assert sweep_config.preprocessor_normalisation(str(tmp_path)) == expected


def test_a_preprocessor_without_numbers_is_named(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": "imagenet"}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json gives no numeric image_mean"):
        sweep_config.preprocessor_normalisation(str(tmp_path))


def test_only_a_normalisation_other_than_unit_range_enters_the_fingerprint(hub_folder, tmp_path):
    config = sweep_config.default_config()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    stamps = [results.fingerprint("vit", folder_entry(folder), config)
              for folder in (hub_folder, plain)]
    entry = folder_entry(plain)
    relevant = entry.to_dict()
    for name in ("tasks", "scorers", "patterns", "seeds", "labels_per_class", "dtype"):
        relevant.pop(name)
    relevant.update(key="vit", seed=config.seed, data_dir=config.data_dir)
    old = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()
    assert stamps[1] == old[:16]
    assert stamps[0] != stamps[1]


# ----------------------------------------------------------------------------------------------
# Pre-training runs as model entries.


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory):
    """A supervised vision run as `es-jax pretrain` leaves it (config.json, a checkpoint at step
    20 of its tiny ViTForImageClassification), and that model."""
    config = pretrain_config.vision_config("supervised", "tiny")
    model = vision.build_model(config)
    model.eval()
    run_dir = tmp_path_factory.mktemp("supervised") / "run"
    manager = checkpointing.open_manager(checkpointing.checkpoint_dir(run_dir), async_save=False)
    state = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)), "step": jnp.int32(20)}
    checkpointing.save(manager, 20, state, None)
    manager.wait_until_finished()
    manager.close()
    checkpointing.store_config(run_dir, config)
    return run_dir, model


def run_entry(source: str, tasks_=("digits",)) -> ml_collections.ConfigDict:
    return sweep_config.model_settings(name=f"checkpoint:{source}", tasks=tasks_, image_size=28,
                                       max_examples=8, max_train_examples=24, batch_size=8,
                                       finetune=FINETUNE)


def test_a_checkpoint_entry_fine_tunes_the_runs_backbone_under_a_new_seeded_head(supervised_run):
    run_dir, trained = supervised_run
    entry = run_entry(str(run_dir))
    assert sweep_config.model_type(entry) == "vit"
    assert sweep.checkpoint_name(entry) == f"checkpoint:{run_dir}@20"
    one, tokenizer = sweep.load_model(entry, tasks.IMAGE_CLASSIFIER, 1, num_labels=10)
    again, _ = sweep.load_model(entry, tasks.IMAGE_CLASSIFIER, 1, num_labels=10)
    other, _ = sweep.load_model(entry, tasks.IMAGE_CLASSIFIER, 2, num_labels=10)
    assert tokenizer is None
    saved, loaded = flat(trained), flat(one)
    assert set(saved) == set(loaded)
    for path, array in saved.items():
        if path.startswith("vit/"):
            np.testing.assert_array_equal(loaded[path], array, err_msg=path)
    assert not np.array_equal(loaded["classifier/kernel"], saved["classifier/kernel"])
    np.testing.assert_array_equal(loaded["classifier/kernel"], flat(again)["classifier/kernel"])
    assert not np.array_equal(loaded["classifier/kernel"], flat(other)["classifier/kernel"])


def test_a_checkpoint_entry_sweeps_and_records_its_step(supervised_run, tmp_path):
    run_dir, trained = supervised_run
    config = sweep_config.default_config()
    config.grid = (0.0, 0.5)
    config.models = ml_collections.ConfigDict({"sup": run_entry(str(run_dir), ("digits_knn",))})
    (run,) = sweep.run(config, tmp_path, progress=False)["runs"]
    assert run["checkpoint"] == f"checkpoint:{run_dir}@20"
    expected = tasks.build_zero_shot(
        "digits_knn", trained.vit, None,
        tasks.TaskSettings(batch_size=8, image_size=28, max_examples=8, max_train_examples=24),
    )
    assert run["dense"] == pytest.approx(expected(nnx.state(trained.vit, nnx.Param)))
    assert run["levels"][1]["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{tmp}/no_such_run", "run directory .*no_such_run does not exist"),
        ("{run}@7", r"no checkpoint at step 7; saved steps: \[20\]"),
        ("{tmp}", "holds no checkpoints/ directory"),
    ],
)
def test_a_missing_run_or_step_is_refused_before_any_work(supervised_run, tmp_path, source,
                                                           message):
    run_dir, _ = supervised_run
    workdir = tmp_path / "work"
    config = sweep_config.default_config()
    config.models = ml_collections.ConfigDict(
        {"sup": run_entry(source.format(tmp=tmp_path, run=run_dir))})
    with pytest.raises(ValueError, match=message):
        sweep.run(config, workdir, progress=False)
    assert not (workdir / "results.json").exists()


# ----------------------------------------------------------------------------------------------
# The :tiny variant of a Fashion-MNIST config.


def test_the_tiny_variant_of_a_fashion_config_runs_end_to_end(tmp_path):
    config = sweep_config.default_config()
    config.models = ml_collections.ConfigDict()
    config.models.vit = sweep_config.model_settings(
        name="google/vit-base-patch16-224-in21k", tasks=("fashion_mnist_few", "digits"),
        seeds=(0, 1, 2), image_size=224)
    config.models.vit_knn = sweep_config.model_settings(
        name="google/vit-base-patch16-224-in21k", tasks=("fashion_knn", "digits_knn"),
        image_size=224)
    config = sweep_config.with_variant(config, "tiny", {"vit": "vit", "vit_knn": "vit"})
    assert config.models.vit.seeds == (0, 1)
    assert (config.models.vit.labels_per_class, config.models.vit.image_size) == (2, 32)
    found = sweep.run(config, tmp_path, progress=False)
    runs = {run["task"]: run for run in found["runs"]}
    assert set(runs) == {"fashion_mnist_few", "fashion_knn"}
    assert runs["fashion_mnist_few"]["seeds"] == [0, 1]
    assert runs["fashion_mnist_few"]["num_examples"] == 8
    assert runs["fashion_knn"]["num_examples"] == 8
    assert [lv["sparsity"] for lv in runs["fashion_knn"]["levels"]] == [0.0, 0.5]


def test_checkpoint_entries_may_not_read_wikipedia_past_the_held_out_articles():
    from es_jax.data import corpora

    config = sweep_config.default_config()
    config.models = ml_collections.ConfigDict()
    config.models.mlm = sweep_config.model_settings(
        name="checkpoint:runs/nowhere", tasks=("wikitext_mlm",), lm_length=128,
        lm_blocks=corpora.HELD_OUT_CHARACTERS // 8 // 128 + 1,
    )
    with pytest.raises(ValueError, match=r"models\.mlm: lm_length \* lm_blocks = .*lm_blocks"):
        sweep_config.check_held_out("mlm", config.models.mlm)
    config.models.mlm.lm_blocks = corpora.HELD_OUT_CHARACTERS // 8 // 128
    sweep_config.check_held_out("mlm", config.models.mlm)
