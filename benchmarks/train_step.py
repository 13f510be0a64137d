"""Pre-training speed and emergence memory, each against its baseline in the same run.

1. Training-step throughput of es_jax's jitted MLM step against transformers' PyTorch
   `BertForMaskedLM` with `torch.optim.AdamW` (same config, batch, masking rate, dropout, gradient
   clipping, same CPU), printed as a ratio; and model FLOPs utilisation of both against a jitted
   fp32 matmul measured in the same run.
2. Peak memory of `es-jax emergence` over N checkpoints for two N (it streams, so it should not
   grow with N).

Run: .venv/bin/python benchmarks/train_step.py [--steps 10] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import machine
import ml_collections
import numpy as np
import torch
from flax import nnx

from es_jax.commands.command_line import mesh_settings
from es_jax.mesh import batch_sharding, from_config, global_batch, replicated, state_shardings
from es_jax.train import checkpointing, mlm, objectives, pretrain

VOCAB = 8000
MASK_ID = 4


def bench_config() -> ml_collections.ConfigDict:
    """A small BERT in the range the CPU emergence runs use."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = ml_collections.ConfigDict(dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=128, dropout=0.1,
    ))
    config.data = ml_collections.ConfigDict(dict(seq_len=128))
    config.global_batch_size = 16
    config.total_steps = 1000
    config.warmup_steps = 100
    config.learning_rate = 1e-4
    config.weight_decay = 0.01
    config.adam_b1, config.adam_b2, config.adam_eps = 0.9, 0.999, 1e-6
    config.grad_clip_norm = 1.0
    config.mask_rate = 0.15
    config.compute_dtype = "float32"
    config.mesh = mesh_settings()
    return config


def model_flops_per_step(config: ml_collections.ConfigDict) -> float:
    """Forward + backward FLOPs a step needs (3x the forward's matmuls, attention included): the
    encoder at every token, the MLM head (transform and decoder) at the predicted ones only
    (mask_rate of them), since the loss needs no other. Both frameworks' MFU use this count,
    so a framework that scores every position does work the count leaves out."""
    m, tokens = config.model, config.global_batch_size * config.data.seq_len
    hidden, layers, seq = m.hidden_size, m.num_hidden_layers, config.data.seq_len
    per_layer = 4 * hidden * hidden + 2 * hidden * m.intermediate_size
    attention = layers * 2 * seq * hidden  # QK^T and AV, per token
    head = config.mask_rate * (hidden * hidden + hidden * VOCAB)
    return 3 * 2 * tokens * (layers * per_layer + attention + head)


def batch_of(config: ml_collections.ConfigDict) -> np.ndarray:
    """A fixed batch of random token ids."""
    shape = (config.global_batch_size, config.data.seq_len)
    return np.random.default_rng(0).integers(5, VOCAB, shape, dtype=np.int32)


def jax_step_seconds(config: ml_collections.ConfigDict, repeats: int) -> float:
    """Seconds per es_jax train step: `mlm.train_step` jitted and watched for divergence by
    `pretrain.compiled_step`, as `es-jax pretrain` runs it (one device)."""
    mesh = from_config(config.mesh)
    optimizer = pretrain.make_optimizer(config)
    build = partial(mlm.build_model, config, VOCAB)
    graphdef, rest = objectives.split_model(build)

    def init_state() -> dict:
        params = nnx.state(build(), nnx.Param).to_pure_dict()
        return objectives.init_train_state(params, optimizer, config.seed)

    shardings = state_shardings(jax.eval_shape(init_state), mesh)
    step_fn = pretrain.compiled_step(
        partial(mlm.train_step, graphdef=graphdef, optimizer=optimizer, mask_token_id=MASK_ID,
                vocab_size=VOCAB, mask_rate=config.mask_rate),
        mesh, shardings,
    )
    tokens = batch_of(config)
    batch = global_batch(
        mlm.with_maskable({"input_ids": tokens, "attention_mask": np.ones_like(tokens)},
                          np.arange(5, dtype=np.int32)),
        batch_sharding(mesh),
    )
    holder = {"state": jax.jit(init_state, out_shardings=shardings)(),
              "health": jax.device_put(pretrain.healthy(), replicated(mesh))}

    def step() -> None:
        holder["state"], metrics, holder["health"] = step_fn(
            holder["state"], batch, rest, holder["health"]
        )
        jax.block_until_ready(metrics["loss"])

    return machine.median_seconds(step, repeats, warmup=2)


def torch_step_seconds(config: ml_collections.ConfigDict, repeats: int) -> float:
    """Seconds per PyTorch step of transformers' BertForMaskedLM with AdamW on the same batch."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    m = config.model
    model = BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads, intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings, hidden_dropout_prob=m.dropout,
        attention_probs_dropout_prob=m.dropout,
    ))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay, eps=config.adam_eps)
    tokens = torch.from_numpy(batch_of(config).astype(np.int64))

    def step() -> None:
        chosen = torch.rand(tokens.shape) < config.mask_rate
        kind = torch.rand(tokens.shape)
        inputs = torch.where(chosen & (kind < 0.8), MASK_ID, tokens)
        random_tokens = torch.randint(0, VOCAB, tokens.shape)
        inputs = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_tokens, inputs)
        labels = torch.where(chosen, tokens, -100)
        loss = model(input_ids=inputs, attention_mask=torch.ones_like(tokens), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        optimizer.step()

    return machine.median_seconds(step, repeats, warmup=2)


def matmul_flops_per_second(size: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 matmul rate, from a jitted square matmul."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    seconds = machine.median_seconds(lambda: jax.block_until_ready(matmul(a)), repeats, warmup=2)
    return 2 * size**3 / seconds


# ----------------------------------------------------------------------------- memory

MEMORY_CHILD = """
import json, resource, sys
from es_jax.analysis import emergence
from es_jax.train import checkpointing
emergence.analyse_run(checkpointing.open_run(sys.argv[1]), thresholds=(1e-3,),
                      relative_thresholds=(0.1,), sparsities=(0.5,))
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def fake_run(directory: Path, num_checkpoints: int, hidden: int, layers: int) -> None:
    """`num_checkpoints` checkpoints of a BERT-shaped parameter tree (params only): the blocks'
    target kernels and the word embeddings (by which the analysis recognises BERT)."""
    manager = checkpointing.open_manager(directory / checkpointing.CHECKPOINT_DIR,
                                         async_save=False)
    rng = np.random.default_rng(0)
    for step in range(num_checkpoints):
        blocks = {}
        for layer in range(layers):
            blocks[str(layer)] = {
                "attention": {n: {"kernel": rng.normal(size=(hidden, hidden)).astype(np.float32)}
                              for n in ("query", "key", "value", "out")},
                "mlp": {"up": {"kernel": rng.normal(size=(hidden, 4 * hidden)).astype(np.float32)},
                        "down": {"kernel": rng.normal(size=(4 * hidden, hidden))
                                 .astype(np.float32)}},
            }
        embeddings = {"word_embeddings": {
            "embedding": rng.normal(size=(VOCAB, hidden)).astype(np.float32)}}
        state = {"params": {"bert": {"embeddings": embeddings, "encoder": {"layers": blocks}}}}
        checkpointing.save(manager, step * 100, jax.tree.map(jnp.asarray, state), None)
    manager.close()


def emergence_peak_memory(num_checkpoints: int, hidden: int, layers: int) -> float:
    """Peak resident MB of a fresh process analysing a run of `num_checkpoints` checkpoints."""
    with tempfile.TemporaryDirectory() as directory:
        fake_run(Path(directory), num_checkpoints, hidden, layers)
        output = subprocess.run([sys.executable, "-c", MEMORY_CHILD, directory], check=True,
                                capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    """Runs the benchmarks and prints one JSON object with the figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per framework")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    before = machine.describe()
    print(f"torch threads: {torch.get_num_threads()}; jax devices: {jax.device_count()} "
          f"{jax.default_backend()}")
    config = bench_config()
    flops = model_flops_per_step(config)
    peak = matmul_flops_per_second()
    jax_seconds = jax_step_seconds(config, args.steps)
    torch_seconds = torch_step_seconds(config, args.steps)
    results = {
        "config": {"hidden": config.model.hidden_size, "layers": config.model.num_hidden_layers,
                   "batch": config.global_batch_size, "seq_len": config.data.seq_len,
                   "vocab": VOCAB},
        "jax_step_s": jax_seconds,
        "torch_step_s": torch_seconds,
        "jax_speedup_vs_torch": torch_seconds / jax_seconds,
        "matmul_gflops": peak / 1e9,
        "model_gflop_per_step": flops / 1e9,
        "jax_mfu": flops / jax_seconds / peak,
        "torch_mfu": flops / torch_seconds / peak,
    }
    if not args.skip_memory:
        hidden, layers = 384, 6
        small, large = 2, 8
        results["emergence_weights_per_checkpoint"] = layers * 12 * hidden * hidden
        results["emergence_checkpoint_mb"] = (layers * 12 * hidden + VOCAB) * hidden * 4 / 2**20
        results[f"emergence_peak_mb_{small}_checkpoints"] = emergence_peak_memory(
            small, hidden, layers)
        results[f"emergence_peak_mb_{large}_checkpoints"] = emergence_peak_memory(
            large, hidden, layers)
        results["emergence_memory_ratio"] = (
            results[f"emergence_peak_mb_{large}_checkpoints"]
            / results[f"emergence_peak_mb_{small}_checkpoints"]
        )
    machine.report(before)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
