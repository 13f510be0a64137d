"""es_jax: essential sparsity in pre-trained transformers, in JAX/Flax."""

__version__ = "0.1.0"
