"""Flax NNX model families (BERT, ViT, OPT, Llama), checkpoint loading/export and Wanda statistics.

    model, tokenizer = models.load("minilm")     # bundled name, local HF folder, .gguf or hub id
    models.export(model, "out/")                 # HF safetensors + config.json for transformers
    models.prunable(model)                       # the family's PRUNABLE selector
    models.activation_norms(model, batches)      # {kernel path: (in,) input L2 norms}
"""

from es_jax.models import bert, layers, llama, opt, vit
from es_jax.models.activations import activation_norms
from es_jax.models.hub import FAMILIES, REGISTRY, export, from_hf, load, prunable

__all__ = [
    "FAMILIES",
    "REGISTRY",
    "activation_norms",
    "bert",
    "export",
    "from_hf",
    "layers",
    "llama",
    "load",
    "opt",
    "prunable",
    "vit",
]
