"""The Figure 7 analysis: normalised-weight histograms per layer, near-zero fractions per matrix,
layer and target set, differences to a reference, on hand-computed arrays, random arrays against
a numpy reference and the real MiniLM weights."""

import math

import jax
import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from es_jax import models, pruning
from es_jax.analysis import weights, weights_plots

# Layer 0: A (std sqrt(2.5)) and B (std sqrt(4.5)); layer 1: C (std sqrt(0.75)).
A = np.array([[-2.0, -1.0], [1.0, 2.0]], np.float32)
B = np.array([[0.0, 0.0, 3.0, -3.0]], np.float32)
C = np.array([[1.0, 1.0], [1.0, -1.0]], np.float32)


def bert_tree(*layers: dict) -> dict:
    """A BERT-shaped parameter tree (word embeddings, then the given blocks)."""
    return {
        "embeddings": {"word_embeddings": {"embedding": np.ones((4, 2), np.float32)}},
        "encoder": {"layers": {str(i): block for i, block in enumerate(layers)}},
    }


def known_tree() -> dict:
    return bert_tree(
        {"attention": {"query": {"kernel": A, "bias": np.zeros(2, np.float32)}},
         "mlp": {"up": {"kernel": B}}},
        {"attention": {"query": {"kernel": C}}},
    )


def test_known_arrays_give_hand_computed_fractions_and_histograms():
    record = weights.analyse_weights(known_tree(), (0.01, 0.7), weights.bin_edges(4, 2.0))
    assert record["family"] == "bert"
    assert record["where"] == models.bert.PRUNABLE
    assert record["target_size"] == 12
    # |w| / std below 0.01: B's two zeros; below 0.7: A's +-1 (0.63) and B's zeros.
    assert record["near_zero"]["matrices"] == {
        "0/attention/query": [0.0, 0.5], "0/mlp/up": [0.5, 0.5], "1/attention/query": [0.0, 0.0]}
    assert record["near_zero"]["layers"] == {"0": [0.25, 0.5], "1": [0.0, 0.0]}
    assert record["near_zero"]["target"] == pytest.approx([2 / 12, 4 / 12])
    # A / std = -1.26, -0.63, 0.63, 1.26; B / std = 0, 0, 1.41, -1.41; C / std = +-1.15.
    assert record["histograms"] == {
        "0": {"counts": [2, 1, 3, 2], "below": 0, "above": 0, "size": 8},
        "1": {"counts": [1, 0, 0, 3], "below": 0, "above": 0, "size": 4},
    }


def test_weights_outside_the_edges_are_counted_below_and_above():
    record = weights.analyse_weights(known_tree(), (0.1,), weights.bin_edges(2, 1.0))
    assert record["histograms"]["0"] == {"counts": [1, 3], "below": 2, "above": 2, "size": 8}
    assert record["histograms"]["1"] == {"counts": [0, 0], "below": 1, "above": 3, "size": 4}


def random_blocks(rng: np.random.Generator, count: int) -> list[dict]:
    """Blocks of q, k, v, out, up, down kernels of different shapes, scales and means."""
    def kernel(rows: int, cols: int) -> dict:
        scale, mean = rng.uniform(0.01, 2.0), rng.uniform(-0.05, 0.05)
        return {"kernel": (mean + scale * rng.standard_normal((rows, cols))).astype(np.float32)}

    return [{"attention": {name: kernel(16, 16) for name in ("query", "key", "value", "out")},
             "mlp": {"up": kernel(16, 48), "down": kernel(48, 16)}} for _ in range(count)]


def test_random_blocks_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    tree = bert_tree(*random_blocks(rng, 3))
    thresholds, edges = (0.01, 0.05, 0.2), weights.bin_edges(30, 3.0)
    record = weights.analyse_weights(tree, thresholds, edges)
    for layer in ("0", "1", "2"):
        block = tree["encoder"]["layers"][layer]
        matrices = jax.tree.leaves(block)
        size = sum(m.size for m in matrices)
        below = [sum(int(np.sum(np.abs(m) < t * np.std(m, dtype=np.float64))) for m in matrices)
                 for t in thresholds]
        assert record["near_zero"]["layers"][layer] == pytest.approx(
            [count / size for count in below], abs=0.5 / size)
        values = np.concatenate([(m / np.std(m, dtype=np.float64)).ravel() for m in matrices])
        histogram = record["histograms"][layer]
        assert histogram["counts"] == np.histogram(values, edges)[0].tolist()
        assert (histogram["below"], histogram["above"]) == (np.sum(values < -3),
                                                            np.sum(values > 3))
        assert histogram["size"] == size


def test_near_zero_fractions_are_pruning_near_zeros_relative_ones():
    tree = bert_tree(*random_blocks(np.random.default_rng(1), 2))
    record = weights.analyse_weights(tree, (0.02, 0.1))
    expected = pruning.near_zero(tree, [0.02, 0.1], where=models.bert.PRUNABLE, relative=True)
    assert record["near_zero"]["target"] == expected["target"]


@pytest.fixture(scope="module")
def minilm_params():
    model, _ = models.load("minilm")
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_real_minilm_layers_match_a_numpy_reference(minilm_params):
    thresholds = (0.01, 0.1)
    record = weights.analyse_weights(minilm_params, thresholds)
    layers = minilm_params["encoder"]["layers"]
    assert list(record["histograms"]) == [str(i) for i in range(6)]
    for index, block in layers.items():
        matrices = [block["attention"][name]["kernel"] for name in ("query", "key", "value",
                                                                     "out")]
        matrices += [block["mlp"]["up"]["kernel"], block["mlp"]["down"]["kernel"]]
        size = sum(m.size for m in matrices)
        below = [sum(int(np.sum(np.abs(m) < t * np.std(m, dtype=np.float64))) for m in matrices)
                 for t in thresholds]
        # jnp's float32 std and numpy's float64 one may put a weight at the bound either side.
        assert record["near_zero"]["layers"][str(index)] == pytest.approx(
            [count / size for count in below], abs=len(matrices) / size)
        histogram = record["histograms"][str(index)]
        counted = sum(histogram["counts"]) + histogram["below"] + histogram["above"]
        assert histogram["size"] == size == counted
    # Normalised weights have second moment 1 about their mean: most mass within +-4 std.
    assert all(h["below"] + h["above"] < 0.01 * h["size"] for h in record["histograms"].values())


def test_densities_integrate_to_the_fraction_inside_the_edges():
    record = weights.analyse_weights(known_tree(), (0.1,), weights.bin_edges(2, 1.0))
    edges = weights.bin_edges(2, 1.0)
    inside = np.sum(weights.densities(record["histograms"]["0"], edges) * np.diff(edges))
    assert inside == pytest.approx(4 / 8)


def reports() -> dict:
    """Two hand-made records: "ssl" above "sl" by 5 and 10 points, layer 1 only in "ssl"."""
    sl = {"near_zero": {"target": [0.05, 0.10], "layers": {"0": [0.04, 0.08]}}}
    ssl = {"near_zero": {"target": [0.10, 0.20], "layers": {"0": [0.06, 0.12],
                                                            "1": [0.5, 0.5]}}}
    return {"sl": sl, "ssl": ssl}


def test_differences_are_points_minus_the_reference_on_common_layers():
    found = weights.differences(reports(), "sl")
    assert list(found) == ["ssl"]
    assert found["ssl"]["target"] == pytest.approx([5.0, 10.0])
    assert found["ssl"]["layers"] == {"0": pytest.approx([2.0, 4.0])}


def test_unknown_reference_is_refused():
    with pytest.raises(ValueError, match=r"reference 'dino' is none of the models \['sl', 'ssl'\]"):
        weights.differences(reports(), "dino")


def test_csv_rows_give_percent_and_points_and_blank_for_the_reference():
    records = reports()
    report = {"thresholds": [0.01, 0.1], "models": records,
              "differences": weights.differences(records, "sl")}
    rows = {(r["model"], r["scope"], r["threshold"]): r for r in weights.csv_rows(report)}
    assert len(rows) == 2 * 2 + 3 * 2
    assert rows[("sl", "target", 0.1)]["near_zero_percent"] == pytest.approx(10.0)
    assert rows[("sl", "target", 0.1)]["minus_reference_points"] == ""
    assert rows[("ssl", "0", 0.01)]["minus_reference_points"] == pytest.approx(2.0)
    assert rows[("ssl", "1", 0.01)]["minus_reference_points"] == ""


def test_bad_inputs_are_refused_naming_the_matrix():
    with pytest.raises(ValueError, match="must both be positive"):
        weights.bin_edges(0, 1.0)
    constant = known_tree()
    constant["encoder"]["layers"]["1"]["attention"]["query"]["kernel"] = np.full((2, 2), 0.5)
    with pytest.raises(ValueError, match=r"encoder/layers/1/attention/query/kernel: every weight "
                                         r"is equal \(std 0\)"):
        weights.analyse_weights(constant, (0.1,))
    broken = known_tree()
    broken["encoder"]["layers"]["0"]["mlp"]["up"]["kernel"] = np.array([[0.0, math.nan]])
    with pytest.raises(ValueError, match="encoder/layers/0/mlp/up/kernel holds NaN or inf"):
        weights.analyse_weights(broken, (0.1,))


def test_plots_show_one_panel_per_layer_and_differences_beside_the_fractions(tmp_path):
    edges = weights.bin_edges(8, 2.0)
    tree = bert_tree(*random_blocks(np.random.default_rng(2), 3))
    records = {"sl": weights.analyse_weights(known_tree(), (0.01, 0.7), edges),
               "ssl": weights.analyse_weights(tree, (0.01, 0.7), edges)}
    both = weights.weights_report(records, "sl", (0.01, 0.7), edges)
    alone = weights.weights_report({"sl": records["sl"]}, "sl", (0.01, 0.7), edges)
    paths = weights_plots.plot_all(both, tmp_path / "both")
    single = weights_plots.plot_near_zero(alone, tmp_path / "alone.png")
    assert [p.name for p in paths] == ["distributions.png", "near_zero.png"]
    width = {name: matplotlib.image.imread(path).shape[1]
             for name, path in (("both", paths[1]), ("alone", single))}
    assert width["both"] == 3 * width["alone"]
    # Three layers in all (the union): one row of 3 panels.
    height, panels_wide = matplotlib.image.imread(paths[0]).shape[:2]
    assert panels_wide > 2 * height
