"""Pre-training checkpoints as models: a real MLM smoke run and vision checkpoints of the vision
objectives' own models, loaded back with their weights exactly and the trained model's outputs;
new heads as a hub export of the same weights gets them; the newest unreadable checkpoint skipped;
bad sources refused with one line."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from es_jax import models, pruning
from es_jax.commands import command_line, pretrain_config
from es_jax.commands import pretrain as pretrain_command
from es_jax.data.wordpiece import WordPieceTokenizer
from es_jax.models import bert, vit
from es_jax.train import checkpointing, dino, mlm, vision
from es_jax.train.checkpoint_models import (
    checkpoint_params,
    is_run,
    load_checkpoint_model,
    parse_source,
)

SMOKE = Path(__file__).parents[2] / "configs" / "pretrain_smoke.py"
TEXTS = ["the minister said on tuesday that the talks would go on", "rain fell in sydney"]


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory) -> Path:
    """A finished MLM smoke run (checkpoints at 0, 1, 3, 10, 20, 30)."""
    workdir = tmp_path_factory.mktemp("mlm") / "run"
    pretrain_command.run(command_line.load_config(str(SMOKE)), workdir)
    return workdir


def flat(tree) -> dict[str, np.ndarray]:
    """Leaves of a pytree by '/'-joined path, as numpy arrays."""
    return {path: np.asarray(leaf)
            for path, leaf in zip(pruning.leaf_paths(tree), jax.tree.leaves(tree), strict=True)}


def params_of(model) -> dict[str, np.ndarray]:
    return flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def assert_same(loaded: dict, saved: dict) -> None:
    """Every saved array is loaded bit for bit under the same path."""
    assert set(saved) <= set(loaded)
    for path, array in saved.items():
        assert loaded[path].dtype == array.dtype, path
        assert np.array_equal(loaded[path], array), path


def trained_mlm(run_dir: Path, step: int):
    """The run's BertForMaskedLM as pre-training built it, its parameters set from the
    checkpoint by flax's own pure-dict replacement (independent of the loader)."""
    config = ml_collections.ConfigDict(json.loads((run_dir / "config.json").read_text()))
    vocab = len(WordPieceTokenizer(run_dir / mlm.TOKENIZER_FILE))
    model = mlm.build_model(config, vocab)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, checkpointing.open_run(run_dir).read_params(step))
    nnx.update(model, state)
    model.eval()
    return model


def token_batch(tokenizer) -> tuple[jax.Array, jax.Array]:
    encoded = tokenizer(TEXTS)
    length = max(len(ids) for ids in encoded["input_ids"])
    ids = np.zeros((len(TEXTS), length), np.int32)
    mask = np.zeros_like(ids)
    for row, tokens in enumerate(encoded["input_ids"]):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


# ----------------------------------------------------------------------------------- MLM run


def test_mlm_run_loads_its_newest_checkpoint_with_the_trained_head_and_logits(mlm_run):
    model, tokenizer = load_checkpoint_model(str(mlm_run), task="mlm")
    assert isinstance(model, bert.BertForMaskedLM)
    assert_same(params_of(model), flat(checkpointing.open_run(mlm_run).read_params(30)))
    reference_tokenizer = WordPieceTokenizer(mlm_run / mlm.TOKENIZER_FILE)
    assert len(tokenizer) == len(reference_tokenizer) == 500
    assert tokenizer(TEXTS)["input_ids"] == reference_tokenizer(TEXTS)["input_ids"]
    ids, mask = token_batch(tokenizer)
    trained = trained_mlm(mlm_run, 30)
    np.testing.assert_allclose(model(ids, mask), trained(ids, mask), rtol=1e-6, atol=1e-6)


def test_step_suffix_reads_that_checkpoint(mlm_run):
    model, _ = load_checkpoint_model(f"{mlm_run}@10", task="mlm")
    run = checkpointing.open_run(mlm_run)
    assert_same(params_of(model), flat(run.read_params(10)))
    kernel = "bert/encoder/layers/0/attention/query/kernel"
    assert not np.array_equal(params_of(model)[kernel], flat(run.read_params(30))[kernel])


def test_backbone_task_gives_the_trained_encoders_hidden_states(mlm_run):
    model, tokenizer = load_checkpoint_model(f"{mlm_run}@20", task=None)
    assert isinstance(model, bert.BertModel)
    trained = trained_mlm(mlm_run, 20)
    ids, mask = token_batch(tokenizer)
    np.testing.assert_allclose(model(ids, mask), trained.bert(ids, mask), rtol=1e-6, atol=1e-6)


def test_new_head_is_what_loading_the_runs_hub_export_gives(mlm_run, tmp_path):
    models.export(trained_mlm(mlm_run, 10), tmp_path / "hf")
    hub_model, _ = models.load(tmp_path / "hf", task="classification", num_labels=3, seed=5)
    model, _ = load_checkpoint_model(f"{mlm_run}@10", task="classification", num_labels=3,
                                     seed=5)
    assert isinstance(model, bert.BertForSequenceClassification)
    assert model.num_labels == 3
    assert_same(params_of(model), params_of(hub_model))
    other_seed, _ = load_checkpoint_model(f"{mlm_run}@10", task="classification", num_labels=3,
                                          seed=6)
    kernel = "classifier/kernel"
    assert not np.array_equal(params_of(other_seed)[kernel], params_of(model)[kernel])


def test_checkpoint_params_are_the_backbone_weights_with_the_family_target_set(mlm_run):
    loaded = checkpoint_params(f"{mlm_run}@3")
    assert loaded.label == f"{mlm_run}@3"
    assert loaded.where == bert.PRUNABLE
    saved = flat(checkpointing.open_run(mlm_run).read_params(3))
    backbone = {path.removeprefix("bert/"): array for path, array in saved.items()
                if path.startswith("bert/")}
    assert_same(flat(loaded.params), backbone)
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(loaded.params))


def test_unreadable_newest_checkpoint_is_skipped_with_a_warning(mlm_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(mlm_run, copy)
    for data in (copy / "checkpoints" / "30" / "state").glob("[do]*"):  # the arrays' files
        shutil.rmtree(data)
    with pytest.warns(UserWarning, match=r"checkpoints/30 could not be read"):
        loaded = checkpoint_params(str(copy))
    assert loaded.label == f"{copy}@20"
    with pytest.raises(ValueError, match=r"checkpoints/30 could not be read.*saved: \["):
        load_checkpoint_model(f"{copy}@30", task=None)


def one_line_error(source: str) -> str:
    """The message of the ValueError that loading `source` raises: one line."""
    with pytest.raises(ValueError, match=r"^[^\n]+$") as error:
        load_checkpoint_model(source, task=None)
    return str(error.value)


def test_bad_sources_are_refused_with_one_line(mlm_run, tmp_path):
    assert "does not exist" in one_line_error(str(tmp_path / "missing"))
    assert "holds no checkpoints/" in one_line_error(str(tmp_path))
    unknown = one_line_error(f"{mlm_run}@7")
    assert "no checkpoint at step 7" in unknown
    assert "[0, 1, 3, 10, 20, 30]" in unknown
    assert "must be a non-negative integer" in one_line_error(f"{mlm_run}@last")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert "no complete checkpoint" in one_line_error(str(tmp_path / "empty"))


def test_unknown_objective_is_refused_naming_the_config(mlm_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(mlm_run, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "objective": "clip"}))
    message = one_line_error(str(copy))
    assert "config.json: unknown objective 'clip'" in message


def test_sources_are_parsed_as_run_and_step(mlm_run):
    assert parse_source("runs/a@12") == (Path("runs/a"), 12)
    assert parse_source("runs/a") == (Path("runs/a"), None)
    assert is_run(str(mlm_run))
    assert is_run("runs/nowhere@3")
    assert not is_run("minilm")
    assert not is_run("facebook/dino-vitb16")


# ----------------------------------------------------------------------------------- vision


def save_vision_run(run_dir: Path, config: ml_collections.ConfigDict, params) -> None:
    """A vision run as pre-training leaves it: config.json and one checkpoint (step 20) whose
    state holds `params`."""
    manager = checkpointing.open_manager(checkpointing.checkpoint_dir(run_dir), async_save=False)
    state = {"params": params, "step": jnp.int32(20)}
    checkpointing.save(manager, 20, state, None)
    manager.wait_until_finished()
    manager.close()
    checkpointing.store_config(run_dir, config)


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory):
    """A supervised run's checkpoint of its tiny ViTForImageClassification, and that model."""
    config = pretrain_config.vision_config("supervised", "tiny")
    model = vision.build_model(config)
    model.eval()
    run_dir = tmp_path_factory.mktemp("supervised") / "run"
    save_vision_run(run_dir, config, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return run_dir, model


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory):
    """A DINO run's checkpoint of its tiny teacher (backbone and projection head), and it."""
    config = pretrain_config.vision_config("dino", "tiny")
    teacher = vision.build_model(config)
    assert isinstance(teacher, dino.DinoModel)
    teacher.eval()
    run_dir = tmp_path_factory.mktemp("dino") / "run"
    save_vision_run(run_dir, config, nnx.to_pure_dict(nnx.state(teacher, nnx.Param)))
    return run_dir, teacher


def images(model) -> jax.Array:
    size, channels = model.config.image_size, model.config.num_channels
    return jax.random.uniform(jax.random.key(3), (2, size, size, channels))


def test_supervised_run_loads_its_classifier_and_gives_its_logits(supervised_run):
    run_dir, trained = supervised_run
    model, tokenizer = load_checkpoint_model(str(run_dir), task="classification")
    assert tokenizer is None
    assert isinstance(model, vit.ViTForImageClassification)
    assert model.num_labels == trained.num_labels == 10
    assert_same(params_of(model), params_of(trained))
    pixels = images(trained)
    np.testing.assert_allclose(model(pixels), trained(pixels), rtol=1e-6, atol=1e-6)


def test_supervised_run_with_other_classes_gets_a_new_seeded_classifier(supervised_run):
    run_dir, trained = supervised_run
    model, _ = load_checkpoint_model(str(run_dir), task="classification", num_labels=3, seed=1)
    again, _ = load_checkpoint_model(str(run_dir), task="classification", num_labels=3, seed=1)
    loaded, saved = params_of(model), params_of(trained)
    backbone = {path: array for path, array in saved.items() if path.startswith("vit/")}
    assert_same(loaded, backbone)
    assert loaded["classifier/kernel"].shape == (trained.config.hidden_size, 3)
    assert np.array_equal(loaded["classifier/kernel"], params_of(again)["classifier/kernel"])


def test_dino_run_loads_the_teachers_backbone(dino_run):
    run_dir, teacher = dino_run
    model, _ = load_checkpoint_model(f"{run_dir}@20", task=None)
    assert isinstance(model, vit.ViTModel)
    backbone = params_of(teacher.vit)
    assert_same(params_of(model), backbone)
    pixels = images(model)
    np.testing.assert_allclose(model(pixels), teacher.vit(pixels), rtol=1e-6, atol=1e-6)
    classifier, _ = load_checkpoint_model(str(run_dir), task="classification", num_labels=4)
    assert_same(params_of(classifier), {f"vit/{p}": a for p, a in backbone.items()})
    assert checkpoint_params(str(run_dir)).where == vit.PRUNABLE
