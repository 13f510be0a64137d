"""Layer-wise distributions of normalised weights and their near-zero mass (the paper's Figure 7).

The paper compares the weights of a supervised and a self-supervised pre-trained ViT of one
architecture (DINO holds about 14% more near-zero weights). Its normalisation is unstated; here
each target matrix W is divided by its own standard deviation, `W / std(W)` (population std,
ddof 0, the mean not subtracted, so "near zero" still means small |w|): the normalisation that
`pruning.near_zero(..., relative=True)` uses, whose fractions these are. For a model's target set
(its family's PRUNABLE: q, k, v, out and both feed-forward kernels of every block) it records:

- per layer (block), a histogram of the normalised weights of all its target matrices over fixed
  bins (`bin_edges`: equal widths over [-limit, limit]), with the counts below and above them;
- the fraction of normalised |w| below each threshold, per target matrix (`LAYER/COMPONENT`, e.g.
  `3/attention/query`), per layer (all its matrices together) and over the whole target set;
- for every model but the reference, its fractions minus the reference's, in percentage points
  (per layer for the layers both models have).

Everything here takes parameter pytrees (numpy or jax arrays) and returns plain JSON-able data;
`es-jax weights` (es_jax.commands.weights) loads the models and writes the files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import numpy as np

from es_jax import pruning
from es_jax.analysis.emergence import grouped, layer_name

THRESHOLDS = (0.01, 0.02, 0.05, 0.1)
BINS = 160
LIMIT = 4.0
SCHEMA_VERSION = 1
NORMALISATION = (
    "each target matrix divided by its own standard deviation (population std, mean not "
    "subtracted): w / std(W), as pruning.near_zero(relative=True)"
)


def bin_edges(bins: int = BINS, limit: float = LIMIT) -> np.ndarray:
    """`bins + 1` edges of equal-width bins over [-limit, limit] (normalised weight units)."""
    if bins <= 0 or not limit > 0:
        raise ValueError(f"bins={bins} and limit={limit} must both be positive.")
    return np.linspace(-limit, limit, bins + 1)


def analyse_weights(
    params: Any,
    thresholds: Sequence[float] = THRESHOLDS,
    edges: np.ndarray | None = None,
    where: str | None = None,
) -> dict[str, Any]:
    """One model's record: its family, target set and size, near-zero fractions (`near_zero`)
    and per-layer histograms (`layer_histograms`) of its normalised target weights.

    The family is recognised from the parameters' paths; `where` defaults to its PRUNABLE.
    """
    from es_jax import models

    family = models.family_of_paths(pruning.leaf_paths(params))
    where = family.PRUNABLE if where is None else where
    matrices = target_matrices(params, where)
    edges = bin_edges() if edges is None else np.asarray(edges, np.float64)
    return {
        "family": family.__name__.rsplit(".", 1)[-1],
        "where": where,
        "target_size": sum(int(matrix.size) for matrix in matrices.values()),
        "near_zero": near_zero(params, where, family, thresholds),
        "histograms": layer_histograms(matrices, family, edges),
    }


def target_matrices(params: Any, where: str) -> dict[str, np.ndarray]:
    """The target leaves of `params` by path, as host arrays; refuses NaN or inf, naming the
    leaf."""
    selected = pruning.select(where)
    matrices = {
        path: np.asarray(leaf)
        for path, leaf in zip(pruning.leaf_paths(params), jax.tree.leaves(params), strict=True)
        if selected(path, leaf)
    }
    if not matrices:
        raise ValueError(f"the target set {where!r} matches no parameter; paths look like "
                         f"{pruning.leaf_paths(params)[:3]}.")
    for path, matrix in matrices.items():
        if not np.isfinite(matrix).all():
            raise ValueError(f"{path} holds NaN or inf; its normalised weights mean nothing "
                             "(a diverged run?).")
    return matrices


def normalised(matrix: np.ndarray, path: str) -> np.ndarray:
    """`matrix / std(matrix)` in float64 (population std); refuses a constant matrix."""
    values = np.asarray(matrix, np.float64)
    std = float(np.std(values))
    if not std > 0:
        raise ValueError(f"{path}: every weight is equal (std 0), so its normalised weights are "
                         "undefined; leave this model out or narrow the target set.")
    return values / std


def matrix_name(family: Any, path: str) -> str:
    """`LAYER/COMPONENT` of a target path (`3/attention/query`), the same in every model of the
    family whatever prefix its task model puts before the blocks."""
    return f"{layer_name(family, path)}/{family.component_of(path)}"


def near_zero(params: Any, where: str, family: Any,
              thresholds: Sequence[float]) -> dict[str, Any]:
    """Fractions of normalised |w| below each threshold (`pruning.near_zero(relative=True)`):
    over the target set (`target`), per layer (`layers`: all its target matrices together) and
    per target matrix (`matrices`, by `matrix_name`); each a list, one value per threshold."""
    found = pruning.near_zero(params, [float(t) for t in thresholds], where=where, relative=True)
    leaves = {path: [float(v) for v in values] for path, values in found["leaves"].items()}
    sizes = {path: int(np.size(leaf))
             for path, leaf in zip(pruning.leaf_paths(params), jax.tree.leaves(params),
                                   strict=True) if path in leaves}
    return {
        "target": [float(v) for v in found["target"]],
        "layers": grouped(leaves, sizes, partial(layer_name, family)),
        "matrices": {matrix_name(family, path): values for path, values in leaves.items()},
    }


def layer_histograms(matrices: Mapping[str, np.ndarray], family: Any,
                     edges: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per layer (block index as a string, in order): `counts` of its normalised target weights
    in each bin of `edges` (the last bin closed, as numpy's), the counts `below` and `above` the
    edges, and `size` (= their sum)."""
    layers: dict[str, dict[str, Any]] = {}
    for path, matrix in matrices.items():
        values = normalised(matrix, path)
        counts, _ = np.histogram(values, bins=edges)
        below, above = int(np.sum(values < edges[0])), int(np.sum(values > edges[-1]))
        layer = layers.setdefault(layer_name(family, path), {
            "counts": np.zeros(len(edges) - 1, np.int64), "below": 0, "above": 0, "size": 0})
        layer["counts"] = layer["counts"] + counts
        layer["below"] += below
        layer["above"] += above
        layer["size"] += int(values.size)
    return {name: {**layers[name], "counts": [int(c) for c in layers[name]["counts"]]}
            for name in sorted(layers, key=layer_order)}


def layer_order(name: str) -> tuple:
    """Sort key of layer names: block indices in numeric order ("2" before "10"), others after."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def densities(histogram: Mapping[str, Any], edges: Sequence[float]) -> np.ndarray:
    """A histogram's probability density per bin: counts / (size * bin width), so that it
    integrates to the fraction of weights inside the edges."""
    widths = np.diff(np.asarray(edges, np.float64))
    return np.asarray(histogram["counts"], np.float64) / (histogram["size"] * widths)


def differences(records: Mapping[str, Mapping[str, Any]], reference: str) -> dict[str, Any]:
    """Each model's near-zero fractions minus the reference's, in percentage points: over the
    target set (`target`) and per layer both have (`layers`); one value per threshold."""
    if reference not in records:
        raise ValueError(f"reference {reference!r} is none of the models {sorted(records)}.")
    base = records[reference]["near_zero"]

    def minus(values: Sequence[float], base_values: Sequence[float]) -> list[float]:
        return [100.0 * (a - b) for a, b in zip(values, base_values, strict=True)]

    result = {}
    for label, record in records.items():
        if label == reference:
            continue
        layers = record["near_zero"]["layers"]
        result[label] = {
            "target": minus(record["near_zero"]["target"], base["target"]),
            "layers": {layer: minus(values, base["layers"][layer])
                       for layer, values in layers.items() if layer in base["layers"]},
        }
    return result


def weights_report(records: Mapping[str, Mapping[str, Any]], reference: str,
                   thresholds: Sequence[float], edges: np.ndarray) -> dict[str, Any]:
    """weights.json: the normalisation, thresholds and bin edges, each model's record
    (`analyse_weights`, plus whatever the caller added, such as its source) and the
    differences to the reference (`differences`)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "normalisation": NORMALISATION,
        "reference": reference,
        "thresholds": [float(t) for t in thresholds],
        "bin_edges": [float(e) for e in edges],
        "models": {label: dict(record) for label, record in records.items()},
        "differences": differences(records, reference),
    }


def csv_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """weights.csv rows: per model, scope (`target` or a layer) and threshold, the near-zero
    percentage and its difference to the reference in points ('' for the reference itself)."""
    rows = []
    for label, record in report["models"].items():
        difference = report["differences"].get(label)
        scopes = {"target": record["near_zero"]["target"], **record["near_zero"]["layers"]}
        for scope, values in scopes.items():
            if difference is None:
                minus = [""] * len(values)
            elif scope == "target":
                minus = difference["target"]
            else:
                minus = difference["layers"].get(scope, [""] * len(values))
            for threshold, value, points in zip(report["thresholds"], values, minus, strict=True):
                rows.append({"model": label, "scope": scope, "threshold": threshold,
                             "near_zero_percent": 100.0 * value, "minus_reference_points": points})
    return rows
