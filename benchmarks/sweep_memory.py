"""The sweep's peak device memory as a multiple of the parameters' bytes, from XLA's compile-time
memory analysis (nothing runs on the device), on the bundled models and a Llama-7B-shaped model.

A sweep level is two compiled programs, and only the parameters and the levels array live between
them (es_jax.commands.sweep, sweep_levels):
  selection   the parameters -> `pruning.levels(targets, 0.1..0.9, scope, transform=jnp.abs)`:
              every nested magnitude mask in one uint8 per target weight, |w| computed inside
              (`sweep_levels.levels_of`): global on the bundled models, one program over every
              target; layerwise on 7B (whose 6.5e9 target weights exceed the 2**32 that exact global
              selection counts), one program a leaf, so its peak is all the parameters + all
              the levels + the largest leaf program's temporaries;
  evaluation  (the parameters, the levels, a level index, the rest of the model state, one
              evaluation batch) -> the task's forward pass with that level's weights zeroed inside
              the program (`evaluators.Masked`): the whole sweep's evaluation cost per batch.
For comparison, the first task's forward pass is also compiled on plain parameters (what
evaluating a pruned copy costs, without the copy): the difference in temporaries is the cost of
masking inside the program. Each program's peak is its argument bytes + output bytes + temporary
bytes from `compiled.memory_analysis()` (argument_size_in_bytes - alias_size_in_bytes +
output_size_in_bytes + temp_size_in_bytes, every argument kept), which counts everything the
program touches: its arguments (all the parameters in both; the levels and the batch in the
evaluation) stay live throughout. The sweep's peak is the larger of the two, printed as a
multiple of the parameters' bytes.

XLA:CPU runs bfloat16 matmuls in float32, converting their weights first, and holds those
float32 copies (2 more bytes a bfloat16 weight) in the evaluation's temporaries, masked or not;
a GPU or TPU program multiplies bfloat16 directly, so the 7B evaluation figures here bound what
an accelerator needs from above (rerun this there for its own figures). The models:
MiniLM (float32, Lee documents: 25 x 256 tokens, mean-pooled embeddings) and SmolLM2 (float32,
Wikipedia perplexity: 4 x 256 tokens) as the default sweep loads them, with their real weights;
Vicuna/Llama-7B in bfloat16 as configs/vicuna_perplexity.py runs it (4 x 1,024 tokens of
perplexity, and 4 x 2,048 tokens of MMLU choice log-likelihoods), as abstract shapes
(`nnx.eval_shape`). The last lines give the largest model that fits one H200 (141 GB) and one TPU
v5e chip (16 GiB) by the 7B figure, in bfloat16 parameters.

Not counted: Wanda's and random scores (4 bytes per target weight while a scorer's curves run;
magnitude stores none), the mask plots (`analysis.plots.plot_mask` prunes a copy of the weights
once per model), and the host-side copy of a checkpoint while it loads. The memory analysis is
the CPU compiler's; a GPU or TPU compiler schedules differently (rerun this there).

    .venv/bin/python benchmarks/sweep_memory.py
"""

from __future__ import annotations

from typing import Any, NamedTuple

import machine

GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))
DEVICES = {"one H200 (141 GB)": 141e9, "one TPU v5e chip (16 GiB)": 16 * 2**30}
GB = 1e9


class Peak(NamedTuple):
    """One program's memory from XLA's analysis, in bytes."""

    arguments: int
    outputs: int
    temporaries: int

    @property
    def total(self) -> int:
        """Arguments + outputs + temporaries: what the program holds at its peak."""
        return self.arguments + self.outputs + self.temporaries


def compiled_peak(function: Any, *arguments: Any) -> Peak:
    """The memory analysis of `jax.jit(function)` compiled for these (abstract) arguments, every
    argument counted (kept even where unused: the sweep holds all the parameters)."""
    import jax

    analysis = jax.jit(function, keep_unused=True).lower(*arguments).compile().memory_analysis()
    return Peak(
        analysis.argument_size_in_bytes - analysis.alias_size_in_bytes,
        analysis.output_size_in_bytes,
        analysis.temp_size_in_bytes,
    )


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf (arrays or ShapeDtypeStructs) of a tree."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract(tree: Any) -> Any:
    """The ShapeDtypeStructs of a tree of arrays."""
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def selection(params: Any, where: Any, scope: str) -> Any:
    """Nested magnitude levels of the target weights in `scope`, as one program."""
    import jax.numpy as jnp

    from es_jax import pruning
    from es_jax.pruning.scores import map_targets

    targets = map_targets(params, where, lambda _, __, leaf: leaf)
    return pruning.levels(targets, GRID, scope=scope, transform=jnp.abs)


def selection_peak(params: Any, where: Any, scope: str) -> Peak:
    """The selection's peak as `sweep_levels.levels_of` runs it: one program (global), or one
    program a leaf while every parameter and every leaf's levels stay live (layerwise,
    per_output)."""
    import jax
    import jax.numpy as jnp

    from es_jax import pruning

    if scope == "global":
        return compiled_peak(lambda p: selection(p, where, scope), params)
    levels = jax.eval_shape(lambda p: selection(p, where, scope), params)
    shapes = {leaf.shape for leaf in jax.tree.leaves(levels)}
    largest = max(
        compiled_peak(lambda x: pruning.levels(x, GRID, scope=scope, transform=jnp.abs),
                      jax.ShapeDtypeStruct(shape, params_dtype(params))).temporaries
        for shape in shapes
    )
    return Peak(tree_bytes(params), tree_bytes(levels), largest)


def params_dtype(params: Any) -> Any:
    """The dtype of the parameters (all of one dtype here)."""
    import jax

    (dtype,) = {leaf.dtype for leaf in jax.tree.leaves(params)}
    return dtype


class Workload(NamedTuple):
    """A model as the sweep evaluates it: its (abstract) module, a name, the selection's scope,
    and per task the forward pass (`model, batch -> outputs`) and an abstract evaluation
    batch."""

    name: str
    model: Any
    scope: str
    tasks: dict[str, tuple[Any, dict[str, Any]]]


class Peaks(NamedTuple):
    """One sweep level's programs: parameter bytes, the selection, each task's evaluation, and
    the first task's evaluation on plain parameters."""

    param_bytes: int
    selection: Peak
    evaluations: dict[str, Peak]
    plain: Peak


def level_peaks(workload: Workload) -> Peaks:
    """The compiled programs of one sweep level of `workload` (see Peaks)."""
    import jax
    import numpy as np

    from es_jax import models
    from es_jax.evaluate import evaluators

    _, params, _ = evaluators.split_params(workload.model)
    params = abstract(params)
    where = models.prunable(workload.model)
    levels = jax.eval_shape(lambda p: selection(p, where, workload.scope), params)
    masked = evaluators.Masked(params, levels, jax.ShapeDtypeStruct((), np.int32))
    evaluations = {}
    for task, (apply, batch) in workload.tasks.items():
        forward = evaluators.make_forward(workload.model, apply)
        evaluations[task] = compiled_peak(forward.jitted, masked, abstract(forward.rest), batch)
    apply, batch = next(iter(workload.tasks.values()))
    forward = evaluators.make_forward(workload.model, apply)
    plain = compiled_peak(forward.jitted, params, abstract(forward.rest), batch)
    chosen = selection_peak(params, where, workload.scope)
    return Peaks(tree_bytes(params), chosen, evaluations, plain)


def text_batch(rows: int, length: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """An abstract evaluation batch of `rows` x `length` tokens."""
    import jax
    import numpy as np

    batch = {
        "input_ids": jax.ShapeDtypeStruct((rows, length), np.int32),
        "attention_mask": jax.ShapeDtypeStruct((rows, length), np.int32),
        "weights": jax.ShapeDtypeStruct((rows,), np.float32),
    }
    for key in extra:
        batch[key] = jax.ShapeDtypeStruct((rows, length), np.float32)
    return batch


def bundled() -> list[Workload]:
    """MiniLM and SmolLM2 with their real weights, as the default sweep evaluates them."""
    from es_jax import models
    from es_jax.evaluate import evaluators

    minilm, _ = models.load("minilm")
    smollm2, _ = models.load("smollm2", task="causal_lm")
    return [
        Workload("minilm (fp32)", minilm, "global",
                 {"lee": (evaluators.mean_pooled, text_batch(25, 256))}),
        Workload("smollm2 (fp32)", smollm2, "global",
                 {"wikitext": (evaluators.causal_lm_nll, text_batch(4, 256))}),
    ]


def llama_7b() -> Workload:
    """A Llama-7B-shaped causal LM (Vicuna-7B's sizes) in bfloat16, abstract, as
    configs/vicuna_perplexity.py evaluates it."""
    import jax.numpy as jnp
    from flax import nnx

    from es_jax.evaluate import evaluators
    from es_jax.evaluate.multiple_choice import continuation_log_likelihoods
    from es_jax.models import llama

    config = llama.LlamaConfig(vocab_size=32000, param_dtype=jnp.bfloat16)
    model = nnx.eval_shape(lambda: llama.build(config, "causal_lm", rngs=nnx.Rngs(0)))
    return Workload("llama-7b (bf16)", model, "layerwise", {
        "wikitext": (evaluators.causal_lm_nll, text_batch(4, 1024)),
        "mmlu": (continuation_log_likelihoods, text_batch(4, 2048, ("continuation_mask",))),
    })


def report(workload: Workload) -> float:
    """Prints one model's programs; returns the sweep's peak as a multiple of its parameters'
    bytes."""
    peaks = level_peaks(workload)
    size = peaks.param_bytes
    print(f"\n{workload.name}: parameters {size / GB:.3f} GB, {workload.scope} selection")
    first = next(iter(peaks.evaluations))
    rows = [("selection", peaks.selection)]
    rows += [(f"evaluation {task}", peak) for task, peak in peaks.evaluations.items()]
    rows += [(f"evaluation {first}, plain parameters", peaks.plain)]
    print(f"  {'program (GB)':<44} {'arguments':>10} {'outputs':>8} {'temporaries':>12}"
          f" {'peak':>8} {'x params':>9}")
    for name, peak in rows:
        print(f"  {name:<44} {peak.arguments / GB:>10.3f} {peak.outputs / GB:>8.3f}"
              f" {peak.temporaries / GB:>12.3f} {peak.total / GB:>8.3f} {peak.total / size:>9.2f}")
    multiple = max(p.total for p in (peaks.selection, *peaks.evaluations.values())) / size
    extra = (peaks.evaluations[first].total - peaks.plain.total) / size
    print(f"  sweep peak: {multiple:.2f} x the parameters' bytes; masking inside the {first} "
          f"evaluation (levels included) adds {extra:.2f} x to evaluating plain parameters")
    return multiple


def main() -> None:
    """Prints the machine, each model's programs and peak multiple, and what fits where."""
    before = machine.describe()
    for workload in bundled():
        report(workload)
    multiple = report(llama_7b())
    print(f"\nthe largest model that fits by the 7B figure ({multiple:.2f} x the parameters' "
          "bytes), in bfloat16 parameters (2 bytes each):")
    for device, capacity in DEVICES.items():
        print(f"  {device}: {capacity / multiple / 2 / 1e9:.1f}B parameters")
    machine.report(before)


if __name__ == "__main__":
    main()
