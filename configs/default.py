"""es-jax sweep --config configs/default.py --workdir runs/default

The embedded default of `es-jax sweep` (what runs with no --config) as a file to copy and edit:
MiniLM zero-shot similarity on Lee, WordSim-353 and SimLex-999 and SmolLM2 perplexity on a fixed
Wikipedia text, magnitude and Wanda scores, global and 2:4 patterns. Runs offline on the bundled
models in minutes on a laptop. Smoke run with tiny random models:
`--config configs/default.py:tiny`.
"""

import ml_collections

from es_jax.commands import sweep_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The embedded default sweep; variant 'tiny' for a smoke run."""
    return sweep_config.get_config(variant)
