"""IMP on a tiny BERT classifier: nested masks of exact counts, rewinding, resume after SIGKILL.

Run as a script (`python test_train_lottery.py DIR`) it is the run the resume test kills: the same
model, data and settings, with an evaluation that stalls from round 1 on.
"""

import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_classifier import classifier, learnable_batch

from es_jax import models, pruning
from es_jax.models import bert
from es_jax.train import checkpointing, lottery
from es_jax.train import finetune as ft

CONFIG = bert.config_from_hf(
    {
        **models.TINY_HF_CONFIGS["bert"],
        "vocab_size": 64,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
    }
)
SEQ_LEN, BATCH, STEPS = 8, 8, 3
FINETUNE = ft.finetune_config(learning_rate=5e-3, weight_decay=0.01)  # STEPS steps: len(batches)
IMP = lottery.ImpConfig(FINETUNE, lottery.sparsity_schedule(3, rate=0.2), where=bert.PRUNABLE)
LEVELS = (0.0, 0.2, 0.4, 0.6)


model_fn = classifier(CONFIG)


def batch(seed, size=BATCH):
    """A batch of the task `model_fn` learns (`tiny_classifier.learnable_batch`)."""
    return learnable_batch(seed, size, CONFIG.vocab_size, SEQ_LEN)


TRAIN = [batch(seed) for seed in range(STEPS)]
HELD_OUT = batch(100, size=32)


def evaluate(params):
    """The held-out loss of a classifier with these parameters (a metric sensitive to every bit)."""
    model = model_fn(nnx.Rngs(0))
    nnx.update(model, params)
    model.eval()
    return float(ft.batch_loss(model, HELD_OUT, "classification"))


def run(checkpoint_dir=None, config=IMP):
    """The IMP run of these tests."""
    return lottery.imp(model_fn, TRAIN, config, evaluate, checkpoint_dir)


def kept(mask):
    """The target entries of a mask, concatenated in leaf order (numpy bools)."""
    return np.concatenate([np.asarray(leaf).ravel() for leaf in jax.tree.leaves(mask)])


def target_weights(params, mask):
    """The target weights (those where `mask` has an array), concatenated in leaf order."""
    pairs = zip(jax.tree.leaves(mask, is_leaf=lambda x: x is None), jax.tree.leaves(params),
                strict=True)
    return np.concatenate([np.asarray(w).ravel() for m, w in pairs if m is not None])


def assert_same_rounds(rounds, expected):
    """Same indices, sparsities, masks (bit for bit), metrics and losses."""
    assert [(r.index, r.sparsity, r.metric) for r in rounds] == [
        (r.index, r.sparsity, r.metric) for r in expected
    ]
    for got, want in zip(rounds, expected, strict=True):
        assert jax.tree.structure(got.mask) == jax.tree.structure(want.mask)
        np.testing.assert_array_equal(kept(got.mask), kept(want.mask))
        np.testing.assert_array_equal(got.losses, want.losses)


def count_finetunes(monkeypatch):
    """A list that gets the sparsity of every mask `finetune` is called with from now on."""
    calls, real = [], ft.finetune

    def counted(model_fn, mask, *args, **kwargs):
        calls.append(1 - kept(mask).mean())
        return real(model_fn, mask, *args, **kwargs)

    monkeypatch.setattr(ft, "finetune", counted)
    return calls


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted run with checkpoints: (its directory, its rounds)."""
    directory = tmp_path_factory.mktemp("imp") / "run"
    return directory, run(directory)


@pytest.fixture(scope="module")
def replayed(finished):
    """Each round's mask fine-tuned again, alone, as the sweep fine-tunes a mask."""
    _, rounds = finished
    return [ft.finetune(model_fn, r.mask, TRAIN, FINETUNE, IMP.seed) for r in rounds]


def test_masks_nest_and_each_round_prunes_exactly_its_count(finished):
    _, rounds = finished
    assert [(r.index, r.sparsity) for r in rounds] == list(enumerate(LEVELS))
    n = kept(rounds[0].mask).size
    assert n == 2 * (4 * 32 * 32 + 2 * 32 * 64)  # the query/key/value/out and FFN kernels
    for r in rounds:
        assert np.sum(~kept(r.mask)) == round(r.sparsity * n)
    for before, after in itertools.pairwise(rounds):
        assert not np.any(kept(after.mask) & ~kept(before.mask))  # pruned stays pruned


def test_round_metric_is_finetune_then_evaluate_of_its_mask(finished, replayed):
    _, rounds = finished
    for r, (model, losses) in zip(rounds, replayed, strict=True):
        assert r.metric == evaluate(nnx.state(model, nnx.Param))
        np.testing.assert_array_equal(r.losses, losses)
    assert len({r.metric for r in rounds}) == len(rounds)  # every mask trains differently


def test_next_mask_prunes_smallest_finetuned_survivors_globally(finished, replayed):
    _, rounds = finished
    for r, (model, _) in zip(rounds[:-1], replayed, strict=False):
        survivors = kept(r.mask)
        magnitudes = np.abs(target_weights(nnx.state(model, nnx.Param), r.mask))
        scores = np.where(survivors, magnitudes, -1.0)
        count = round(LEVELS[r.index + 1] * scores.size)
        expected = np.ones(scores.size, bool)
        expected[np.argsort(scores, kind="stable")[:count]] = False
        np.testing.assert_array_equal(kept(rounds[r.index + 1].mask), expected)


@pytest.mark.parametrize("rewind_step", [0, 2])
def test_survivors_restart_from_the_rewind_point(rewind_step, monkeypatch):
    config = dataclasses.replace(IMP, sparsities=(0.3, 0.5), rewind_step=rewind_step)
    starts, real = [], ft.finetune

    def recording(model_fn, mask, *args, stop_after=None, **kwargs):
        if stop_after is None:  # a round's fine-tuning, not the run to the rewind point
            starts.append((nnx.state(model_fn(nnx.Rngs(IMP.seed)), nnx.Param), mask))
        return real(model_fn, mask, *args, stop_after=stop_after, **kwargs)

    monkeypatch.setattr(ft, "finetune", recording)
    rounds = run(config=config)
    pretrained = nnx.state(model_fn(nnx.Rngs(IMP.seed)), nnx.Param)
    point = lottery.rewind_weights(model_fn, rounds[0].mask, TRAIN, config)
    target = pretrained if rewind_step == 0 else point
    assert len(starts) == len(rounds)
    for leaf, expected in zip(jax.tree.leaves(starts[0][0]), jax.tree.leaves(pretrained),
                              strict=True):
        np.testing.assert_array_equal(leaf, expected)  # round 0: dense, from the pre-trained
    for start, mask in starts[1:]:
        for leaf, expected in zip(jax.tree.leaves(start), jax.tree.leaves(target), strict=True):
            np.testing.assert_array_equal(leaf, expected)  # every parameter, head included
        survivors = kept(mask)
        np.testing.assert_array_equal(target_weights(start, mask)[survivors],
                                      target_weights(target, mask)[survivors])
    changed = [not np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(point), jax.tree.leaves(pretrained), strict=True)]
    assert any(changed) == (rewind_step > 0)


def test_rewinding_leaves_a_stored_pretrained_state_as_it_was():
    graphdef, params, rest = nnx.split(model_fn(nnx.Rngs(IMP.seed)), nnx.Param, ...)
    before = [np.array(leaf) for leaf in jax.tree.leaves(params)]
    merged = lambda rngs: nnx.merge(graphdef, params, rest)  # as the sweep's fine-tuning builds
    config = dataclasses.replace(IMP, sparsities=(0.3,), rewind_step=2)
    rounds = lottery.imp(merged, TRAIN, config, evaluate)
    for leaf, expected in zip(jax.tree.leaves(params), before, strict=True):
        np.testing.assert_array_equal(leaf, expected)
    assert [r.metric for r in rounds] == [r.metric for r in run(config=config)]


def test_rewind_point_at_the_last_step_is_the_dense_finetune():
    params = nnx.state(model_fn(nnx.Rngs(IMP.seed)), nnx.Param)
    dense = pruning.unstructured(pruning.magnitude(params, where=IMP.where), 0.0)
    config = dataclasses.replace(IMP, rewind_step=STEPS)
    point = lottery.rewind_weights(model_fn, dense, TRAIN, config)
    model, _ = ft.finetune(model_fn, dense, TRAIN, FINETUNE, IMP.seed)
    for leaf, expected in zip(jax.tree.leaves(point),
                              jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True):
        np.testing.assert_array_equal(leaf, expected)


def test_killed_run_resumes_to_the_rounds_of_an_uninterrupted_one(finished, tmp_path,
                                                                  monkeypatch):
    _, expected = finished
    directory = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, __file__, str(directory)],
                                   stdout=subprocess.DEVNULL, stderr=stderr, env=os.environ.copy())
    round_0 = checkpointing.checkpoint_dir(directory) / "0" / "commit_success.txt"
    deadline = time.monotonic() + 120
    while not round_0.exists():
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "round 0 was not saved in time"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = sorted(int(p.name) for p in checkpointing.checkpoint_dir(directory).iterdir()
                   if p.name.isdigit())
    assert saved == [0]  # killed while round 1 was running
    calls = count_finetunes(monkeypatch)
    assert_same_rounds(run(directory), expected)
    assert calls == pytest.approx(LEVELS[1:], abs=1e-3)  # resumed at round 1


def test_finished_run_is_read_back_without_training(finished, monkeypatch):
    directory, expected = finished
    calls = count_finetunes(monkeypatch)
    assert_same_rounds(run(directory), expected)
    assert calls == []


def test_missing_round_is_refused(finished, tmp_path):
    source, _ = finished
    shutil.copytree(source, tmp_path / "run")
    shutil.rmtree(checkpointing.checkpoint_dir(tmp_path / "run") / "1")
    with pytest.raises(ValueError, match=r"lacks the checkpoints of rounds \[1\] before round 3"):
        run(tmp_path / "run")


def test_damaged_round_is_named(finished, tmp_path):
    source, _ = finished
    shutil.copytree(source, tmp_path / "run")
    round_2 = checkpointing.checkpoint_dir(tmp_path / "run") / "2"
    for data_file in (round_2 / "state" / "d").iterdir():
        data_file.write_bytes(data_file.read_bytes()[:7])  # cut short
    with pytest.raises(checkpointing.UnreadableCheckpoint, match="checkpoints/2 could not be read"):
        run(tmp_path / "run")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sparsities": (0.2, 0.4)}, r"sparsities: \[0\.2, 0\.4, 0\.6\] -> \[0\.2, 0\.4\]"),
        ({"seed": 1}, "seed: 0 -> 1"),
        ({"rewind_step": 1}, "rewind_step: 0 -> 1"),
        ({"finetune": ft.finetune_config(learning_rate=1e-3)}, "finetune.learning_rate"),
        ({"where": r".*/attention/query/kernel"}, r"where: .*\n  targets\."),
    ],
)
def test_directory_of_other_settings_is_refused(finished, tmp_path, change, message):
    source, _ = finished
    directory = tmp_path / "run"
    shutil.copytree(source, directory)
    stored = (directory / checkpointing.CONFIG_FILE).read_text()
    with pytest.raises(ValueError, match=message):
        run(directory, dataclasses.replace(IMP, **change))
    assert (directory / checkpointing.CONFIG_FILE).read_text() == stored
    assert json.loads(stored)["sparsities"] == list(LEVELS[1:])


def test_unevaluated_run_in_an_evaluated_directory_is_refused(finished, tmp_path):
    source, _ = finished
    shutil.copytree(source, tmp_path / "run")
    with pytest.raises(ValueError, match="evaluated: True -> False"):
        lottery.imp(model_fn, TRAIN, IMP, None, tmp_path / "run")


def test_sparsity_schedule_removes_a_rate_of_the_original_count_per_round():
    assert lottery.sparsity_schedule(10) == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert lottery.sparsity_schedule(3, rate=0.05) == (0.05, 0.1, 0.15)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: lottery.sparsity_schedule(0), "do not make sparsities"),
        (lambda: lottery.sparsity_schedule(11), "do not make sparsities"),
        (lambda: run(config=dataclasses.replace(IMP, sparsities=(0.4, 0.2))), "ascending"),
        (lambda: run(config=dataclasses.replace(IMP, sparsities=(0.0, 0.2))), "ascending"),
        (lambda: run(config=dataclasses.replace(IMP, sparsities=())), "ascending"),
        (lambda: run(config=dataclasses.replace(IMP, rewind_step=STEPS + 1)), "rewind_step 4"),
        (
            lambda: lottery.imp(model_fn, TRAIN[:1], dataclasses.replace(
                IMP, finetune=dataclasses.replace(FINETUNE, total_steps=STEPS), rewind_step=2)),
            "ran out after 1 of 2 batches",
        ),
    ],
)
def test_bad_settings_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


if __name__ == "__main__":
    evaluations = itertools.count()

    def stalling(params):
        """`evaluate`, stalling from its second call on (round 1), where the test kills it."""
        if next(evaluations) > 0:
            time.sleep(600)
        return evaluate(params)

    lottery.imp(model_fn, TRAIN, IMP, stalling, sys.argv[1])
