"""MLM pre-training of BERT from scratch, with Orbax checkpoints that resume exactly.

`es-jax pretrain --config configs/pretrain_smoke.py --workdir runs/smoke` trains, saves checkpoints
under `runs/smoke/checkpoints/` and, run again, resumes from the newest readable one. One code path
runs on one CPU and on a TPU pod: a `jax.sharding.Mesh` over every device with a `data` axis,
batches split along it, parameters replicated or FSDP-sharded (`config.fsdp`), and
`jax.distributed.initialize()` first when `config.distributed` is set (every host runs the same
command).
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from es_jax.train import checkpointing
from es_jax.train.mlm import mask_tokens, mlm_loss

DATA_AXIS = "data"
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Config keys that change how a run is executed or logged, not what it computes.
RUN_ONLY_KEYS = ("force", "log_every", "async_checkpoints", "distributed")


# ----------------------------------------------------------------------------- set-up


def make_mesh() -> Mesh:
    """A one-axis mesh over every device of every host (data parallel, and FSDP when asked)."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def leaf_spec(shape: tuple[int, ...], mesh_size: int, fsdp: bool) -> P:
    """FSDP shards a leaf's largest axis divisible by the mesh; small leaves stay replicated."""
    if not fsdp or mesh_size == 1 or int(np.prod(shape, dtype=np.int64)) < 2**12:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % mesh_size == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool) -> Any:
    """NamedShardings for every leaf of the train state, decided by its shape alone."""
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, leaf_spec(leaf.shape, mesh.size, fsdp)), abstract_state
    )


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to the peak learning rate, then linear decay to zero at the last step."""
    warmup = min(config.warmup_steps, config.total_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
            optax.linear_schedule(config.learning_rate, 0.0, max(config.total_steps - warmup, 1)),
        ],
        boundaries=[warmup],
    )


def decays(params: Any) -> Any:
    """Weight decay on matrices only: no decay on biases and LayerNorm scales (1-D leaves)."""
    return jax.tree.map(lambda leaf: leaf.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with warm-up and linear decay, after clipping the global gradient norm."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=decays,
        ),
    )


# ----------------------------------------------------------------------------- model and state


def bert_config(config: ml_collections.ConfigDict, vocab_size: int):
    """The BertConfig of the model to pre-train, with the tokenizer's vocabulary size."""
    from es_jax.models import bert

    model = config.model
    return bert.BertConfig(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        intermediate_size=model.intermediate_size,
        max_position_embeddings=model.max_position_embeddings,
        hidden_dropout_prob=model.dropout,
        attention_probs_dropout_prob=model.dropout,
        dtype=jnp.dtype(config.compute_dtype),
    )


def build_model(config: ml_collections.ConfigDict, vocab_size: int) -> nnx.Module:
    """A freshly initialised BertForMaskedLM, seeded by `config.seed`."""
    from es_jax.models import bert

    rngs = nnx.Rngs(params=config.seed, dropout=config.seed + 1)
    return bert.BertForMaskedLM(bert_config(config, vocab_size), rngs=rngs)


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, seed: int):
    """The checkpointed train state: params, optimizer state, step and the RNG key's data."""
    params = nnx.state(model, nnx.Param).to_pure_dict()
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed + 2)),
    }


def initial_layout(
    config: ml_collections.ConfigDict,
    vocab_size: int,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[nnx.GraphDef, Any, Any, nnx.State]:
    """The model's graph, the train state's shapes and shardings, and its non-parameter state."""
    abstract_model = nnx.eval_shape(lambda: build_model(config, vocab_size))
    graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
    abstract = jax.eval_shape(
        lambda: init_train_state(build_model(config, vocab_size), optimizer, config.seed)
    )
    rest = jax.jit(lambda: nnx.split(build_model(config, vocab_size), nnx.Param, ...)[2])()
    return graphdef, abstract, state_shardings(abstract, mesh, config.fsdp), rest


def train_step(
    state: dict[str, Any],
    batch: dict[str, jax.Array],
    rest: nnx.State,
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    mask_token_id: int,
    vocab_size: int,
    mask_rate: float,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One AdamW step on a batch's MLM loss; masking and dropout keys come from (rng, step)."""
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    mask_key, dropout_key = jax.random.split(step_key)
    inputs, labels, weights = mask_tokens(
        mask_key, batch["input_ids"], batch["maskable"], mask_token_id, vocab_size, mask_rate
    )
    model = nnx.merge(graphdef, state["params"], rest)
    nnx.reseed(model, dropout=dropout_key)
    model.train()

    def loss_fn(model: nnx.Module) -> tuple[jax.Array, dict]:
        logits = model(inputs, attention_mask=batch["attention_mask"])
        return mlm_loss(logits, labels, weights)

    (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    grads = grads.to_pure_dict()
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    new_state = {
        "params": optax.apply_updates(state["params"], updates),
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "rng": state["rng"],
    }
    return new_state, {**metrics, "grad_norm": optax.tree.norm(grads)}


# ----------------------------------------------------------------------------- data


def corpus_documents(name: str) -> list[str]:
    """Texts of a corpus: the offline "wikipedia"/"lee_background", or a tfds name's `text`."""
    from es_jax import data

    if name in ("wikipedia", "lee_background"):
        return data.documents(name)
    records = data.source(name, "train")
    texts = (records[i]["text"] for i in range(len(records)))
    return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]


def train_wordpiece(texts: list[str], vocab_size: int, path: Path):
    """A lower-cased BERT WordPiece tokenizer trained on `texts`, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # The trainer orders equally frequent pieces at random: number them canonically instead, so
    # the same texts always give the same ids (runs on several data volumes share a vocabulary).
    pieces = sorted(set(tokenizer.get_vocab()) - set(SPECIAL_TOKENS))
    vocab = {piece: i for i, piece in enumerate([*SPECIAL_TOKENS, *pieces])}
    tokenizer.model = models.WordPiece(vocab, unk_token="[UNK]")
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return tokenizer


class WordPieceTokenizer:
    """The few tokenizer attributes the pipelines use, over a `tokenizers.Tokenizer`.

    Loading through transformers costs seconds of imports in every process; this keeps a run's
    start (and a resumed run's restart) short.
    """

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(path))
        for kind in ("pad", "unk", "cls", "sep", "mask"):
            setattr(self, f"{kind}_token_id", self.backend.token_to_id(f"[{kind.upper()}]"))
        self.eos_token_id = None
        self.all_special_ids = [self.backend.token_to_id(t) for t in SPECIAL_TOKENS]

    def __len__(self) -> int:
        return self.backend.get_vocab_size()

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list]:
        """Token ids of each text, as transformers' tokenizers return them."""
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}


def load_tokenizer(config: ml_collections.ConfigDict, workdir: Path):
    """The run's tokenizer: a WordPiece vocabulary cached in the workdir, or a named one."""
    if config.data.tokenizer != "wordpiece":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(config.data.tokenizer)
    path = workdir / TOKENIZER_FILE
    if not path.exists():
        if jax.process_index() == 0:
            texts = [t for name in config.data.corpora for t in corpus_documents(name)]
            partial_path = path.with_suffix(".partial")
            train_wordpiece(texts, config.data.vocab_size, partial_path)
            partial_path.rename(path)
        _sync_hosts("tokenizer")
    return WordPieceTokenizer(path)


def _sync_hosts(name: str) -> None:
    """A barrier across hosts (a no-op on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def training_documents(config: ml_collections.ConfigDict) -> list[str]:
    """The run's data volume: a seeded random fraction of the corpora's documents."""
    from es_jax.data.pipelines import subset_documents

    texts = [t for name in config.data.corpora for t in corpus_documents(name)]
    return subset_documents(texts, config.data.fraction, config.data.seed)


def training_dataset(config: ml_collections.ConfigDict, tokenizer):
    """This host's grain dataset of packed-sequence batches (endless, reshuffled every epoch)."""
    from es_jax.data.pipelines import packed_lm_dataset

    return packed_lm_dataset(
        training_documents(config),
        tokenizer,
        seq_len=config.data.seq_len,
        batch_size=config.global_batch_size // jax.process_count(),
        seed=config.data.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )


def with_maskable(batch: dict[str, np.ndarray], special_ids: np.ndarray) -> dict:
    """The model inputs of a host batch, plus `maskable`: real tokens that are not special."""
    input_ids = np.asarray(batch["input_ids"], np.int32)
    attention_mask = np.asarray(batch["attention_mask"], np.int32)
    maskable = ~np.isin(input_ids, special_ids) & (attention_mask > 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "maskable": maskable}


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's part of the batch placed as one global array split along the data axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


# ----------------------------------------------------------------------------- the loop


def write_log(workdir: Path, record: dict[str, Any]) -> None:
    """Appends one JSON line to the run's training log (host 0 only)."""
    if jax.process_index() == 0:
        with open(workdir / "train_log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")


def compiled_step(config, graphdef, optimizer, tokenizer, vocab_size, mesh, shardings):
    """The jitted train step, its state sharded as `shardings` and batches along the data axis."""
    step = partial(
        train_step,
        graphdef=graphdef,
        optimizer=optimizer,
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=vocab_size,
        mask_rate=config.mask_rate,
    )
    return jax.jit(
        step,
        in_shardings=(shardings, NamedSharding(mesh, P(DATA_AXIS)), None),
        out_shardings=(shardings, NamedSharding(mesh, P())),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Pre-trains (or resumes) to `config.total_steps`; returns the last logged metrics."""
    workdir = Path(workdir).absolute()
    if config.distributed:
        jax.distributed.initialize()
    workdir.mkdir(parents=True, exist_ok=True)
    checkpointing.check_config(workdir, config, force=config.force, ignore=RUN_ONLY_KEYS)
    if config.global_batch_size % jax.device_count():
        raise ValueError(
            f"global_batch_size {config.global_batch_size} is not divisible by the "
            f"{jax.device_count()} devices; pick a multiple."
        )
    mesh = make_mesh()
    tokenizer = load_tokenizer(config, workdir)
    vocab_size = len(tokenizer)
    special_ids = np.asarray([tokenizer.pad_token_id, *tokenizer.all_special_ids], np.int32)
    optimizer = make_optimizer(config)
    graphdef, abstract, shardings, rest = initial_layout(config, vocab_size, optimizer, mesh)

    manager = checkpointing.open_manager(
        workdir / checkpointing.CHECKPOINT_DIR, config.async_checkpoints
    )
    iterator = iter(training_dataset(config, tokenizer))
    restored = checkpointing.restore_latest(
        manager,
        jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                     abstract, shardings),
    )
    if restored is None:
        start = 0
        state = jax.jit(
            lambda: init_train_state(build_model(config, vocab_size), optimizer, config.seed),
            out_shardings=shardings,
        )()
        checkpointing.save(manager, 0, state, iterator.get_state())
    else:
        start, state, data_state = restored
        iterator.set_state(data_state)

    step_fn = compiled_step(config, graphdef, optimizer, tokenizer, vocab_size, mesh, shardings)
    save_at = set(checkpointing.checkpoint_steps(
        config.total_steps, config.checkpoint_every, config.log_spaced_checkpoints
    ))
    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
    metrics: dict[str, Any] = {}
    progress = _progress(start, config.total_steps)
    started = time.perf_counter()
    for step in range(start + 1, config.total_steps + 1):
        batch = global_batch(with_maskable(next(iterator), special_ids), batch_sharding)
        state, step_metrics = step_fn(state, batch, rest)
        progress.update(1)
        if step in save_at or step % config.log_every == 0:
            metrics = {"step": step, **{k: float(v) for k, v in step_metrics.items()}}
            progress.set_postfix(loss=f"{metrics['loss']:.3f}")
        if step in save_at:
            checkpointing.save(manager, step, state, iterator.get_state())
            write_log(workdir, metrics)
    manager.wait_until_finished()
    manager.close()
    progress.close()
    elapsed = time.perf_counter() - started
    summary = {
        **metrics,
        "total_steps": config.total_steps,
        "resumed_from": start,
        "seconds": elapsed,
        "steps_per_second": (config.total_steps - start) / max(elapsed, 1e-9),
        "checkpoints": sorted(save_at),
    }
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(summary, indent=2))
        plot_loss(workdir)
    return summary


def plot_loss(workdir: Path) -> None:
    """Writes `loss.png`: the MLM loss against step, from the run's training log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = workdir / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    records = sorted({r["step"]: r for r in map(json.loads, filter(None, lines))}.values(),
                     key=lambda r: r["step"])
    if not records:
        return
    figure, axis = plt.subplots(figsize=(5.5, 3.5))
    axis.plot([r["step"] for r in records], [r["loss"] for r in records], marker=".")
    axis.set_xlabel("step")
    axis.set_ylabel("MLM loss")
    axis.set_title(workdir.name)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(workdir / "loss.png", dpi=110)
    plt.close(figure)


def _progress(start: int, total: int):
    """A tqdm progress bar over the steps (silent on hosts other than 0)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=start, desc="pretrain", unit="step",
        disable=jax.process_index() != 0, file=sys.stderr,
    )


# ----------------------------------------------------------------------------- command line


def parse_flags(argv: list[str]) -> tuple[ml_collections.ConfigDict, Path]:
    """Reads `--config FILE` (with `--config.key=value` overrides), `--workdir` and `--force`."""
    flag_values = flags.FlagValues()
    command_line = ["es-jax pretrain", *argv]
    config_flags.DEFINE_config_file(
        "config", None, "ml_collections config file.", flag_values=flag_values,
        lock_config=True, sys_argv=command_line,
    )
    flags.DEFINE_string(
        "workdir", None, "Directory for checkpoints and logs.", flag_values=flag_values
    )
    flags.DEFINE_bool(
        "force", False, "Continue a workdir that holds a different config.", flag_values=flag_values
    )
    flag_values(command_line)
    if flag_values.config is None or flag_values.workdir is None:
        raise ValueError("es-jax pretrain needs --config FILE and --workdir DIR.")
    config = flag_values.config
    if flag_values.force:
        with config.unlocked():
            config.force = True
    return config, Path(flag_values.workdir)


def main(argv: list[str]) -> None:
    """`es-jax pretrain --config FILE --workdir DIR [--config.key=value ...] [--force]`."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(main.__doc__)
        return
    config, workdir = parse_flags(argv)
    summary = train_and_evaluate(config, workdir)
    print(json.dumps({k: v for k, v in summary.items() if k != "checkpoints"}))
