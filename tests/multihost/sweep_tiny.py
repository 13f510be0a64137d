r"""es-jax sweep --config tests/multihost/sweep_tiny.py --workdir DIR

The `:tiny` default sweep cut to its one encoder entry (a tiny random MiniLM on Lee, global
magnitude pruning at 0 and 50%): the smallest sweep that loads a model, prunes it and evaluates it
on a real data set, for the multi-process tests.
"""

import ml_collections

from es_jax.commands import sweep_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The default sweep's `:tiny` variant with only its `minilm` entry."""
    del variant
    config = sweep_config.get_config("tiny")
    for key in [key for key in config.models if key != "minilm"]:
        del config.models[key]
    return config
