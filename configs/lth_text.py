"""es-jax lth --config configs/lth_text.py --workdir runs/lth_text

Lottery tickets against one-shot magnitude pruning (the paper's section 4.3, Figures 9 and 10) on
two small real text-classification tasks: MiniLM fine-tuned on `pang_lee` (movie-review
polarity) and `text_source` (Wikipedia vs Lee news sentences), each seed holding out its own
random 20% (repeated random-split cross-validation). IMP prunes 10% of the original target count
per round up to 50% and rewinds to the pre-trained weights; OMP prunes the pre-trained weights
once per level; both are fine-tuned alike (5 epochs, batch 16, learning rate 1e-4) and scored
by held-out accuracy, for seeds 0, 1 and 2.

It runs on every device (`--config.mesh.data`, `--config.mesh.fsdp`: es_jax.mesh; fsdp > 1
shards parameters, optimizer states and masks); the fine-tuning batch must split over each host's
devices.

`:tiny` runs a tiny random BERT with the bundled MiniLM tokenizer: 2 seeds, sparsities 0.1 and
0.2, 2 fine-tuning steps (a smoke test of the whole command, about a minute on 2 cores).
"""

from es_jax.commands import lth_config


def get_config(variant: str = ""):
    """The text LTH vs OMP comparison; variant 'tiny' for the smoke run."""
    return lth_config.get_config(variant)
