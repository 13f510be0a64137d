"""Pre-training with its workdir in a Cloud Storage bucket, emulated by a local folder
(`fake_bucket`): every file of the run lands in the bucket through `gs://` URLs, nothing lands
anywhere else, and its checkpoints read back through the same URLs."""

import json
import os

import jax
import numpy as np
from fake_bucket import local_buckets

from es_jax.commands import command_line, pretrain_config
from es_jax.train import checkpoint_models, checkpointing, pretrain

RUN = "gs://bucket/runs/supervised"


def test_a_run_in_a_bucket_writes_only_there_and_reads_back_through_its_url(
    tmp_path, monkeypatch
):
    bucket_root, elsewhere = tmp_path / "buckets", tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a URL that lost a slash would land here, as gs:/bucket/...
    config = pretrain_config.vision_config("supervised", "tiny")
    with local_buckets(bucket_root):
        workdir = command_line.check_workdir(RUN)
        assert os.fspath(workdir) == RUN
        summary = pretrain.train_and_evaluate(config, workdir)
        params = checkpointing.open_run(RUN).read_params(20)
        model, _ = checkpoint_models.load_checkpoint_model(f"{RUN}@10", task="classification")
    assert list(elsewhere.iterdir()) == []
    run = bucket_root / "bucket" / "runs" / "supervised"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "config.json", "results.json", "train_log.jsonl"]
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir())
    assert saved == summary["checkpoints"] == [0, 1, 10, 20]
    # Orbax took its Cloud Storage path: each checkpoint committed by a marker file.
    assert all((run / "checkpoints" / str(step) / "commit_success.txt").exists() for step in saved)
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").open()] == [1, 10, 20]
    assert json.loads((run / "results.json").read_text())["knn_test"] == 200
    assert json.loads((run / "config.json").read_text())["objective"] == "supervised"
    # The same checkpoints read from the local folder directly, outside the emulated bucket.
    at_20 = checkpointing.read_state(run / "checkpoints", 20)["params"]
    for read, local in zip(jax.tree.leaves(params), jax.tree.leaves(at_20), strict=True):
        np.testing.assert_array_equal(read, local)
    at_10 = checkpointing.read_state(run / "checkpoints", 10)["params"]
    np.testing.assert_array_equal(model.classifier.kernel.get_value(),
                                  at_10["classifier"]["kernel"])
