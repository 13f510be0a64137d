"""The `es-jax` command: one sub-command per job, each living in its own module.

Each sub-command module exposes `main(argv: list[str]) -> None`; it is imported only when chosen,
so `es-jax pretrain` never pays for the sweep's imports and vice versa.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "sweep": ("es_jax.evaluate.sweep", "one-shot pruning sweep and essential sparsity"),
    "pretrain": ("es_jax.train.pretrain", "MLM pre-training with Orbax checkpoints"),
    "emergence": ("es_jax.analysis.emergence", "near-zero weights, mask overlap by checkpoint"),
}


def usage() -> str:
    """The help text listing the sub-commands."""
    lines = ["usage: es-jax COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run `es-jax COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Dispatches to the chosen sub-command's `main`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"es-jax: unknown command {name!r}.\n\n{usage()}")
    module = importlib.import_module(COMMANDS[name][0])
    module.main(rest)


if __name__ == "__main__":
    main()
