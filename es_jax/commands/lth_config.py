"""es-jax lth --workdir runs/lth   (this file is the embedded default config)

The config of `es-jax lth` and its checks: the embedded default (`default_config()`, also
`get_config()` so that `--config es_jax/commands/lth_config.py[:tiny]` works like any config
file), the `:tiny` variant (`with_variant`: a tiny random BERT, 2 seeds, 2 levels, 2 fine-tuning
steps), the sweep model entry the command loads its model through (`model_entry`), the settings
that stored results depend on (`result_settings`), and `validate`, which refuses a bad config with
one line before any work.
"""

from __future__ import annotations

import ml_collections

from es_jax.commands import sweep_config
from es_jax.commands.command_line import mesh_settings
from es_jax.evaluate import tasks as task_registry
from es_jax.train import lottery

TEXT_TASKS = ("pang_lee", "text_source")


def default_config() -> ml_collections.ConfigDict:
    """MiniLM on the two small real text tasks: IMP at 10..50% against OMP, 3 seeds."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        {
            "name": "minilm",  # bundled name, local HF folder or hub id (a BERT)
            # HF config.json fields of a random tiny model used instead of `name` (tests, smoke
            # runs), e.g. models.TINY_HF_CONFIGS["bert"]; empty = load `name`.
            "tiny": ml_collections.ConfigDict(),
            "tokenizer": "minilm",  # the tokenizer of a tiny model
        }
    )
    config.tasks = TEXT_TASKS
    config.sparsities = lottery.sparsity_schedule(5)  # 0.1..0.5: 10% of the original per round
    config.rewind_step = 0  # 0 = rewind to the pre-trained weights
    config.seeds = (0, 1, 2)  # seed s: the s-th random held-out split and the fine-tuning seed
    # FinetuneConfig overrides (es_jax.train.finetune); total_steps 0 = every batch of the epochs.
    config.finetune = ml_collections.ConfigDict(
        {"num_epochs": 5, "batch_size": 16, "learning_rate": 1e-4, "total_steps": 0}
    )
    config.max_length = 64  # tokens per text
    config.batch_size = 32  # evaluation batch size
    config.data_dir = ""  # '' = the data package's default
    # Devices along the mesh's data and fsdp axes (es_jax.mesh; -1 = the rest). The fine-tuning
    # batch_size must be a multiple of the devices of each host.
    config.mesh = mesh_settings()
    return config


TOP_LEVEL_KEYS = frozenset(default_config().keys())
MODEL_KEYS = frozenset(default_config().model.keys())
MESH_KEYS = frozenset(default_config().mesh.keys())


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The embedded default; variant 'tiny' for a smoke run of a tiny random BERT."""
    return with_variant(default_config(), variant)


def with_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """The config as it is (variant ''), or shrunk to a smoke run (variant 'tiny'): a tiny random
    BERT with the bundled MiniLM tokenizer, seeds (0, 1), sparsities (0.1, 0.2), 2 fine-tuning
    steps of 8 texts of 32 tokens (8: a batch splits over up to 8 devices)."""
    from es_jax.models import hub

    if variant == "tiny":
        config.model.tiny = ml_collections.ConfigDict(hub.TINY_HF_CONFIGS["bert"])
        config.seeds = (0, 1)
        config.sparsities = (0.1, 0.2)
        config.finetune = ml_collections.ConfigDict(
            {"num_epochs": 1, "batch_size": 8, "learning_rate": 5e-5, "total_steps": 2}
        )
        config.max_length = 32
        config.batch_size = 8
    elif variant:
        raise ValueError(f"unknown config variant {variant!r}; use FILE or FILE:tiny.")
    return config


def model_entry(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config as a sweep model entry (`sweep_config.model_settings`), what
    `sweep.finetune_setup` loads a model and builds a task's data from."""
    return sweep_config.model_settings(
        name=config.model.name,
        tiny=config.model.tiny.to_dict(),
        tokenizer=config.model.tokenizer,
        tasks=tuple(config.tasks),
        batch_size=config.batch_size,
        max_length=config.max_length,
        finetune=config.finetune.to_dict(),
    )


def result_settings(config: ml_collections.ConfigDict) -> dict:
    """What every stored value depends on besides its task and seed: the model, the levels (an
    IMP level depends on the ones before it), the rewind step, fine-tuning, text length, data.
    Tasks and seeds may change between runs of one workdir: their values are stored apart, and
    so may the mesh, which changes values only by float rounding."""
    keys = ("model", "sparsities", "rewind_step", "finetune", "max_length", "batch_size",
            "data_dir")
    plain = {key: config[key] for key in keys}
    return {key: value.to_dict() if isinstance(value, ml_collections.ConfigDict)
            else list(value) if isinstance(value, tuple) else value
            for key, value in plain.items()}


def validate(config: ml_collections.ConfigDict) -> None:
    """Refuses, with one line naming the key and what to give instead, unknown keys, a model
    that is not a text classifier, unknown or non-fine-tune tasks, levels that are not strictly
    ascending in (0, 1), a negative rewind step, seeds that are not distinct non-negative
    integers, unknown or non-positive fine-tuning settings, non-positive lengths, and a mesh
    that does not fit the devices or does not split the fine-tuning batch over them."""
    unknown = sorted(set(config.keys()) - TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(TOP_LEVEL_KEYS)}.")
    extra = sorted(set(config.model.keys()) - MODEL_KEYS)
    if extra:
        raise ValueError(f"model: unknown keys {extra}; known: {sorted(MODEL_KEYS)}.")
    check_tasks(config.tasks)
    check_model(config)
    levels = list(config.sparsities)
    if not levels or any(not 0 < s < 1 for s in levels) or levels != sorted(set(levels)):
        raise ValueError(f"sparsities={tuple(levels)} are not strictly ascending levels in "
                         "(0, 1); give e.g. 0.1,0.2,0.3 (lottery.sparsity_schedule).")
    if config.rewind_step < 0:
        raise ValueError(f"rewind_step={config.rewind_step} is negative; give 0 (rewind to the "
                         "pre-trained weights) or a step of the dense fine-tuning.")
    seeds = list(config.seeds)
    distinct = len(set(seeds)) == len(seeds)
    if not seeds or not distinct or any(type(s) is not int or s < 0 for s in seeds):
        raise ValueError(f"seeds={tuple(seeds)} are not distinct non-negative integers; give "
                         "e.g. 0,1,2 (seed s draws the s-th held-out split).")
    check_finetune(config)
    for name in ("max_length", "batch_size"):
        if config[name] <= 0:
            raise ValueError(f"{name}={config[name]} must be positive.")
    check_mesh(config)


def check_tasks(tasks: tuple[str, ...]) -> None:
    """Refuses no tasks, a repeated or unknown task, and a task with no classes to fine-tune."""
    if not tasks or len(set(tasks)) < len(tasks):
        raise ValueError(f"tasks={tuple(tasks)}: give distinct fine-tune tasks, e.g. "
                         f"{TEXT_TASKS}.")
    for name in tasks:
        try:
            task = task_registry.get(name)
        except ValueError as error:
            raise ValueError(f"tasks: {error}") from None
        if task.protocol != "finetune" or task_registry.num_labels(name) is None:
            raise ValueError(f"tasks: {name!r} is not a fine-tune classification task; use "
                             f"e.g. {TEXT_TASKS}.")


def check_model(config: ml_collections.ConfigDict) -> None:
    """Refuses a model whose family cannot take every task's head (read without weights)."""
    entry = model_entry(config)
    try:
        family = sweep_config.family_name(sweep_config.model_type(entry))
    except (OSError, KeyError) as error:
        raise ValueError(f"model: cannot read the model's config ({error}); give a bundled "
                         "name such as 'minilm', a local HF folder or model.tiny.") from None
    for name in config.tasks:
        head = task_registry.get(name).head
        if family not in sweep_config.HEAD_FAMILIES[head]:
            raise ValueError(f"model: a {family} model cannot be fine-tuned on {name!r}; give "
                             f"a {' or '.join(sweep_config.HEAD_FAMILIES[head])} model.")


def check_finetune(config: ml_collections.ConfigDict) -> None:
    """Refuses unknown fine-tuning settings (via `sweep_config.finetune_config`) and
    non-positive epochs, batch size or learning rate, or negative total steps."""
    entry = model_entry(config)
    try:
        sweep_config.finetune_config(config.tasks[0], entry)
    except ValueError as error:
        raise ValueError(f"finetune: {error}") from None
    overrides = config.finetune.to_dict()
    for name in ("num_epochs", "batch_size", "learning_rate"):
        if name in overrides and not overrides[name] > 0:
            raise ValueError(f"finetune.{name}={overrides[name]} must be positive.")
    if overrides.get("total_steps", 0) < 0:
        raise ValueError(f"finetune.total_steps={overrides['total_steps']} is negative; give "
                         "0 (every batch of the epochs) or a step count.")


def check_mesh(config: ml_collections.ConfigDict) -> None:
    """Refuses unknown mesh keys, a mesh that does not fit the devices (`mesh.mesh_shape`), and
    a fine-tuning batch size that does not split over this host's devices (each host fine-tunes
    on batches of its own records: `finetune.finetune(..., mesh=)`)."""
    import jax

    from es_jax import mesh

    extra = sorted(set(config.mesh.keys()) - MESH_KEYS)
    if extra:
        raise ValueError(f"mesh: unknown keys {extra}; known: {sorted(MESH_KEYS)}.")
    mesh.mesh_shape(int(config.mesh.data), int(config.mesh.fsdp), jax.device_count())
    devices = jax.local_device_count()
    for task in config.tasks:
        batch_size = sweep_config.finetune_config(task, model_entry(config)).batch_size
        if batch_size % devices:
            raise ValueError(f"finetune.batch_size={batch_size} does not split over the {devices} "
                             f"devices of this host; give a multiple of {devices}.")
