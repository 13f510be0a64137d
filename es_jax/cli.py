"""The `es-jax` command: dispatches `es-jax COMMAND ...` to `es_jax.commands.COMMAND.main`.

A command module is imported only when chosen, so `es-jax pretrain` never pays for the sweep's
imports. Whatever a command refuses (a bad command line, a bad config, bad input) arrives as a
ValueError and is printed as one line, never a traceback; so is an OSError (a file that cannot be
read or written, a full disk), named by its path.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import es_jax
from es_jax.commands import command_line

# Each module of es_jax.commands listed here has `main(argv)`, `SUMMARY` (one line) and
# `DEFAULT_CONFIG` (its embedded config's factory, or None where `--config` is required).
COMMANDS: dict[str, str] = {
    "sweep": "one-shot pruning sweep and essential sparsity",
    "pretrain": "pre-training with Orbax checkpoints that resume exactly",
    "emergence": "near-zero weights and mask overlap across checkpoints",
    "lth": "lottery tickets (IMP) vs one-shot magnitude pruning",
    "weights": "layer-wise normalised-weight distributions and near-zero fractions (Fig. 7)",
}


def usage() -> str:
    """The help text listing the commands."""
    lines = [
        "usage: es-jax COMMAND [--config FILE[:variant]] --workdir DIR [--config.KEY=VALUE ...]",
        "       es-jax --version",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {help_text}" for name, help_text in COMMANDS.items()]
    lines += ["", "Run `es-jax COMMAND --help` for a command's config keys and their defaults."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the chosen command; exits with one line on a ValueError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] == "--version":
        print(f"es-jax {es_jax.__version__}")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"es-jax: unknown command {name!r}.\n\n{usage()}")
    module = importlib.import_module(f"es_jax.commands.{name}")
    try:
        if any(arg in ("-h", "--help") for arg in rest):
            print(command_line.help_text(name, module.SUMMARY, rest, module.DEFAULT_CONFIG))
            return
        module.main(rest)
    except ValueError as error:
        sys.exit(f"es-jax {name}: {error}")
    except OSError as error:
        sys.exit(f"es-jax {name}: {os_error_line(error)}")


def os_error_line(error: OSError) -> str:
    """An OSError as one line: the path it concerns and the system's reason."""
    if error.filename is None:
        return str(error)
    return f"{error.filename}: {error.strerror or type(error).__name__}."


if __name__ == "__main__":
    main()
