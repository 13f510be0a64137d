"""`es-jax lth`: lottery tickets (IMP) against one-shot magnitude pruning (OMP), and their masks.

    es-jax lth [--config FILE[:tiny]] --workdir DIR [--config.key=value ...]

The paper's section 4.3 comparison (Figures 9 and 10) on fine-tune classification tasks. For each
seed s (the s-th random held-out split of each task and the fine-tuning seed) and task, the model
entry is loaded with a new head initialised from s (`sweep.finetune_setup`) and:

- LTH: `lottery.imp` with rewinding to `rewind_step` (0: the pre-trained weights), the family's
  PRUNABLE weights as target set, checkpointed in `WORKDIR/imp/<task>/<seed>/` (it resumes by
  itself). Round 0 is the dense fine-tune (`dense`); round r the ticket of sparsity s_r (`lth`).
- OMP: for each sparsity, the global magnitude mask of the pre-trained weights (`pruning.omp`:
  the same mask for every task and seed), fine-tuned with the same `finetune.finetune`, seed and
  data order, and evaluated on the same held-out split (`omp`).
- Mask similarity (`pruning.similarity`): each ticket against the OMP mask of its sparsity, and
  the tickets of two tasks of the same seed against each other.

Every finished value and similarity is written to `WORKDIR/results.json` at once (atomically,
strict JSON), so a killed run started again with the same command skips what is stored and ends
with the values of a run never interrupted (fine-tuning is deterministic). A workdir whose values
were computed with other settings is refused. At the end results.json gains per task the mean,
sample std and per-seed values of each method at each level, the paired LTH - OMP differences and
the similarities averaged over seeds; with results.csv, lth_minus_omp.png, similarity.png and
summary.md.

Everything runs on the device mesh of `config.mesh` (`es_jax.mesh`): parameters, optimizer states
and masks sharded by its rule, fine-tuning batches split over every device. Every host computes;
only host 0 writes results.json, the CSV, the plots and summary.md, and holds the workdir's lock
(the IMP checkpoints are written by Orbax from every host).
"""

from __future__ import annotations

import csv
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from es_jax import mesh as mesh_lib
from es_jax.commands import command_line, lth_config
from es_jax.commands.sweep import finetune_setup, finite
from es_jax.commands.sweep_results import exclusive, write_atomically
from es_jax.evaluate import tasks as task_registry
from es_jax.train import checkpointing

SUMMARY = "Lottery tickets (IMP) vs one-shot magnitude pruning, fine-tuned alike; mask similarity."
DEFAULT_CONFIG = lth_config.default_config
SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
SIMILARITY_KEYS = ("cosine", "iou", "chance_cosine", "chance_iou")
CSV_FIELDS = ("task", "method", "sparsity", "mean", "std", "seeds", "lth_omp_cosine",
              "chance_cosine", "lth_omp_iou", "chance_iou")


def main(argv: Sequence[str]) -> None:
    """`es-jax lth`: parses the command line, runs the comparison and prints its summary."""
    config, workdir = command_line.parse("lth", argv, DEFAULT_CONFIG)
    results = run(config, workdir)
    print(summary_table(results))
    print(f"\nresults: {workdir / RESULTS_FILE}, {workdir / 'results.csv'}, plots in {workdir}")


def run(config: ml_collections.ConfigDict, workdir: str | Path, progress: bool = True) -> dict:
    """Runs (or resumes) the comparison; writes results.json, results.csv, the plots and
    summary.md; returns the results."""
    lth_config.validate(config)
    workdir = command_line.check_workdir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    entry = lth_config.model_entry(config)
    mesh = mesh_lib.from_config(config.mesh)
    with exclusive(workdir, "lth"):
        store = Store(workdir, config)
        pairs = list(itertools.product(config.seeds, config.tasks))
        visible = progress and jax.process_index() == 0
        with tqdm(total=len(pairs), disable=not visible, unit="task") as bar:
            for seed in config.seeds:
                tickets = {}
                for task in config.tasks:
                    bar.set_description(f"{task} seed {seed}")
                    if not (store.task_done(task, seed) and store.seed_done(seed)):
                        tickets[task] = compare(config, entry, store, workdir, task, seed, mesh)
                    bar.update(1)
                if not store.seed_done(seed):
                    for a, b in itertools.combinations(config.tasks, 2):
                        for sparsity, mask_a, mask_b in zip(config.sparsities, tickets[a],
                                                            tickets[b], strict=True):
                            store.put_similarity((f"lth:{a}", f"lth:{b}"), seed, sparsity,
                                                 mask_a, mask_b)
        results = store.finish(time.perf_counter() - start)
    if jax.process_index() == 0:
        write_csv(results["runs"], workdir / "results.csv")
        plot(results, workdir)
        (workdir / "summary.md").write_text(summary_table(results) + "\n")
    return results


def compare(config: ml_collections.ConfigDict, entry: ml_collections.ConfigDict, store: Store,
            workdir: Path, task: str, seed: int, mesh: Mesh) -> list[Any]:
    """IMP (resumed from its checkpoints) and OMP at every level of one task and seed on `mesh`,
    storing what is missing; returns the tickets' masks, one per sparsity."""
    from flax import nnx

    from es_jax import models, pruning
    from es_jax.train import finetune, lottery

    setup = finetune_setup(entry, task, seed, config.data_dir)
    where = models.prunable(setup.model)
    imp_config = lottery.ImpConfig(setup.ft_config, tuple(config.sparsities), where, seed,
                                   config.rewind_step)
    rounds = lottery.imp(setup.model_fn, setup.data.train, imp_config, setup.data.evaluator,
                         checkpoint_dir=workdir / "imp" / task / str(seed), mesh=mesh)
    store.put_value(task, seed, "dense", 0.0, rounds[0].metric)
    for ticket in rounds[1:]:
        store.put_value(task, seed, "lth", ticket.sparsity, ticket.metric)
    params = finetune.on_mesh(nnx.state(setup.model, nnx.Param), mesh)
    _, omp_masks = pruning.omp(params, list(config.sparsities), where=where)
    for ticket, mask in zip(rounds[1:], omp_masks, strict=True):
        if store.value(task, seed, "omp", ticket.sparsity) is None:
            trained, _ = finetune.finetune(setup.model_fn, mask, setup.data.train,
                                           setup.ft_config, seed, mesh=mesh)
            metric = setup.data.evaluator(nnx.state(trained, nnx.Param))
            store.put_value(task, seed, "omp", ticket.sparsity, metric)
        store.put_similarity((f"lth:{task}", "omp"), seed, ticket.sparsity, ticket.mask, mask)
    return [ticket.mask for ticket in rounds[1:]]


# ----------------------------------------------------------------------------------------------
# results.json: every value as it is finished, then the aggregates.


class Store:
    """WORKDIR/results.json while the command runs: the settings its values depend on, each
    finished (task, seed, method, sparsity) value and mask similarity, rewritten atomically as
    strict JSON after every addition. Values of the config's tasks and seeds are aggregated by
    `finish`; those of other tasks and seeds stay stored as they are."""

    def __init__(self, workdir: Path, config: ml_collections.ConfigDict):
        self.path = workdir / RESULTS_FILE
        self.config = config
        self.settings = lth_config.result_settings(config)
        document = read_results(self.path)
        check_settings(self.path, document.get("settings", self.settings), self.settings)
        self.values = {value_key(r): r for r in document.get("values", [])}
        self.similarities = {similarity_key(r): r for r in document.get("similarities", [])}

    def value(self, task: str, seed: int, method: str, sparsity: float) -> float | None:
        """The stored value, or None."""
        record = self.values.get((task, seed, method, sparsity))
        return None if record is None else record["value"]

    def task_done(self, task: str, seed: int) -> bool:
        """True when every value and LTH-vs-OMP similarity of this task and seed is stored."""
        levels = self.config.sparsities
        keys = [(task, seed, "dense", 0.0)] + [(task, seed, method, s) for s in levels
                                               for method in ("lth", "omp")]
        compared = [((f"lth:{task}", "omp"), seed, s) for s in levels]
        return all(k in self.values for k in keys) and all(k in self.similarities
                                                            for k in compared)

    def seed_done(self, seed: int) -> bool:
        """True when the tickets of every two tasks of this seed have been compared."""
        return all(((f"lth:{a}", f"lth:{b}"), seed, s) in self.similarities
                   for a, b in itertools.combinations(self.config.tasks, 2)
                   for s in self.config.sparsities)

    def put_value(self, task: str, seed: int, method: str, sparsity: float, value: Any) -> None:
        """Stores a finished value (refusing a non-finite one, naming it) and saves."""
        label = f"{task} seed {seed} {method} at {sparsity:g} sparsity"
        record = {"task": task, "seed": seed, "method": method, "sparsity": sparsity,
                  "value": finite(value, label)}
        if self.values.get(value_key(record)) != record:
            self.values[value_key(record)] = record
            self.save()

    def put_similarity(self, masks: tuple[str, str], seed: int, sparsity: float, mask_a: Any,
                       mask_b: Any) -> None:
        """Stores the similarity of two masks of one seed and sparsity (unless stored) and saves."""
        from es_jax import pruning

        if (masks, seed, sparsity) in self.similarities:
            return
        measured = pruning.similarity(mask_a, mask_b)
        record = {"masks": list(masks), "seed": seed, "sparsity": sparsity,
                  **{k: finite(measured[k], f"{masks} seed {seed} {k}") for k in SIMILARITY_KEYS}}
        self.similarities[similarity_key(record)] = record
        self.save()

    def save(self, aggregates: dict | None = None) -> dict:
        """Rewrites results.json atomically as strict JSON (host 0), with `aggregates` when
        given; returns the document as read back from that JSON."""
        document = {
            "schema_version": SCHEMA_VERSION,
            "settings": self.settings,
            "config": self.config.to_dict(),
            "values": sorted(self.values.values(), key=lambda r: value_key(r)),
            "similarities": sorted(self.similarities.values(), key=lambda r: similarity_key(r)),
            **(aggregates or {}),
        }
        try:
            text = json.dumps(document, indent=1, allow_nan=False)
        except ValueError as error:
            raise ValueError(f"{self.path}: refusing to write a non-finite number ({error})."
                             ) from None
        if jax.process_index() == 0:
            write_atomically(self.path, text + "\n")
        return json.loads(text)

    def finish(self, seconds: float) -> dict:
        """Adds the aggregates of the config's tasks and seeds (`aggregate`), saves, returns the
        document."""
        aggregates = {**aggregate(self.config, self.values, self.similarities),
                      "seconds": seconds}
        return self.save(aggregates)


def value_key(record: dict) -> tuple:
    """(task, seed, method, sparsity) of a value record."""
    return record["task"], record["seed"], record["method"], record["sparsity"]


def similarity_key(record: dict) -> tuple:
    """((mask, mask), seed, sparsity) of a similarity record."""
    return tuple(record["masks"]), record["seed"], record["sparsity"]


def read_results(path: Path) -> dict:
    """What a results.json holds ({} when there is none); ValueError naming the file when it
    cannot be read as strict JSON with a list of values."""
    if not path.exists():
        return {}

    def refuse(name: str) -> float:
        raise ValueError(f"a non-finite number ({name})")

    try:
        document = json.loads(path.read_text(), parse_constant=refuse)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} cannot be read as the results of es-jax lth "
                         f"({command_line.first_line(error)}); move it away or use another "
                         "--workdir.") from None
    if not isinstance(document, dict) or not isinstance(document.get("values"), list):
        raise ValueError(f"{path} is not the results of es-jax lth (no list of values); move it "
                         "away or use another --workdir.")
    return document


def check_settings(path: Path, stored: dict, settings: dict) -> None:
    """Refuses stored results computed with other settings, naming each difference."""
    differences = checkpointing.config_differences(stored, settings)
    if differences:
        raise ValueError(f"{path} holds values computed with other settings "
                         f"({'; '.join(differences)}); use another --workdir for these settings.")


# ----------------------------------------------------------------------------------------------
# Aggregates, CSV, summary and plots.


def spread(values: Sequence[float]) -> dict:
    """{"mean", "std" (sample std; None for one value), "values"}."""
    values = [float(v) for v in values]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std, "values": values}


def mean_similarity(records: Sequence[dict]) -> dict:
    """The similarity measures averaged over seeds, with the per-seed records."""
    means = {k: float(np.mean([r[k] for r in records])) for k in SIMILARITY_KEYS}
    per_seed = [{"seed": r["seed"], **{k: r[k] for k in SIMILARITY_KEYS}} for r in records]
    return {**means, "per_seed": per_seed}


def aggregate(config: ml_collections.ConfigDict, values: dict, similarities: dict) -> dict:
    """Per task: dense, and per level OMP, LTH, their paired difference and the LTH-vs-OMP
    similarity over the config's seeds (in seed order); per level and pair of tasks, the
    tickets' similarity over seeds."""
    seeds = list(config.seeds)
    runs = []
    for task in config.tasks:
        info = task_registry.get(task)
        levels = []
        for s in config.sparsities:
            omp = [values[(task, seed, "omp", s)]["value"] for seed in seeds]
            lth = [values[(task, seed, "lth", s)]["value"] for seed in seeds]
            compared = [similarities[((f"lth:{task}", "omp"), seed, s)] for seed in seeds]
            levels.append({"sparsity": s, "omp": spread(omp), "lth": spread(lth),
                           "lth_minus_omp": spread([b - a for a, b in zip(omp, lth, strict=True)]),
                           "similarity": mean_similarity(compared)})
        dense = [values[(task, seed, "dense", 0.0)]["value"] for seed in seeds]
        runs.append({"task": task, "metric": info.metric, "higher_is_better": info.higher_is_better,
                     "seeds": seeds, "dense": spread(dense), "levels": levels})
    task_similarity = [
        {"sparsity": s, "tasks": [a, b],
         **mean_similarity([similarities[((f"lth:{a}", f"lth:{b}"), seed, s)] for seed in seeds])}
        for s in config.sparsities for a, b in itertools.combinations(config.tasks, 2)
    ]
    return {"runs": runs, "task_similarity": task_similarity}


def write_csv(runs: Sequence[dict], path: Path) -> None:
    """One row per task, sparsity and method (dense at 0): mean, std and number of seeds; the
    LTH and OMP rows with their level's LTH-vs-OMP similarity and its chance values."""
    rows = []
    for run in runs:
        rows.append({"task": run["task"], "method": "dense", "sparsity": 0.0,
                     **csv_cells(run["dense"])})
        for level in run["levels"]:
            similarity = level["similarity"]
            compared = {"lth_omp_cosine": similarity["cosine"], "lth_omp_iou": similarity["iou"],
                        "chance_cosine": similarity["chance_cosine"],
                        "chance_iou": similarity["chance_iou"]}
            for method in ("omp", "lth"):
                rows.append({"task": run["task"], "method": method, "sparsity": level["sparsity"],
                             **csv_cells(level[method]), **compared})
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def csv_cells(values: dict) -> dict:
    """The mean, std ('' for one seed) and seed count of a spread."""
    std = "" if values["std"] is None else values["std"]
    return {"mean": values["mean"], "std": std, "seeds": len(values["values"])}


def shown(values: dict) -> str:
    """A spread as `mean ± std` (`mean` alone for one seed)."""
    return f"{values['mean']:.2f}" + ("" if values["std"] is None else f" ± {values['std']:.2f}")


def summary_table(results: dict) -> str:
    """Markdown: per task and sparsity, OMP and LTH (mean ± std over seeds), the paired LTH - OMP
    difference, and the cosine of ticket and OMP mask against chance."""
    lines = ["| task | sparsity | OMP | LTH | LTH - OMP | cosine LTH/OMP (chance) |",
             "|---|---|---|---|---|---|"]
    for run in results["runs"]:
        lines.append(f"| {run['task']} ({run['metric']}) | dense | {shown(run['dense'])} | "
                     f"{shown(run['dense'])} | | |")
        for level in run["levels"]:
            similarity = level["similarity"]
            lines.append(f"| {run['task']} | {100 * level['sparsity']:g}% | {shown(level['omp'])} "
                         f"| {shown(level['lth'])} | {shown(level['lth_minus_omp'])} | "
                         f"{similarity['cosine']:.3f} ({similarity['chance_cosine']:.3f}) |")
    return "\n".join(lines)


def plot(results: dict, workdir: Path) -> list[Path]:
    """lth_minus_omp.png (the paper's Figure 9 view) and similarity.png (Figure 10)."""
    from es_jax.analysis import lottery_plots

    return [lottery_plots.plot_lth_minus_omp(results["runs"], workdir / "lth_minus_omp.png"),
            lottery_plots.plot_similarity(results["runs"], results["task_similarity"],
                                          workdir / "similarity.png")]
