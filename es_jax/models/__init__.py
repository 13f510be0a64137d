"""Flax NNX model families (BERT, ViT, OPT, Llama), checkpoint loading/export, activation statistics
and block-by-block pruning with calibration data (SparseGPT, Wanda).

    model, tokenizer = models.load("minilm")     # bundled name, local HF folder, .gguf or hub id
    models.export(model, "out/")                 # HF safetensors + config.json for transformers
    models.prunable(model)                       # the family's PRUNABLE selector
    models.activation_norms(model, batches)      # {kernel path: (in,) input L2 norms}
    models.activation_grams(model, batches)      # {kernel path: (in, in) sum of x x^T}
    pruned, mask = models.prune_sequential(model, batches, "sparsegpt", sparsity=0.5)
    family = models.family_of_paths(paths)       # the family of a parameter tree's paths
    family.layer_of(path), family.component_of(path)   # 3, "attention/query"

Every family module fulfils `models.Family`.
"""

from es_jax.models import bert, hf_names, layers, llama, opt, vit
from es_jax.models.activations import activation_grams, activation_norms
from es_jax.models.family import Family
from es_jax.models.hub import (
    FAMILIES,
    REGISTRY,
    TINY_HF_CONFIGS,
    export,
    family_for,
    family_of,
    family_of_paths,
    from_hf,
    load,
    prunable,
)
from es_jax.models.sequential import prune_sequential

__all__ = [
    "FAMILIES",
    "REGISTRY",
    "TINY_HF_CONFIGS",
    "Family",
    "activation_grams",
    "activation_norms",
    "bert",
    "export",
    "family_for",
    "family_of",
    "family_of_paths",
    "from_hf",
    "hf_names",
    "layers",
    "llama",
    "load",
    "opt",
    "prunable",
    "prune_sequential",
    "vit",
]
