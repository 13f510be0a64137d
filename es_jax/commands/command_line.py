"""The one command line every `es-jax` command reads, parsed with `ml_collections.config_flags`.

    es-jax COMMAND --config FILE[:variant] --workdir DIR [--config.key=value ...]

`FILE` is a Python file whose `get_config(variant)` returns a ConfigDict; `FILE:tiny` passes
"tiny". A command with an embedded default config makes `--config` optional. Overrides follow
config_flags: a value is read with the type of the value it replaces; a tuple is written as a
Python literal (`--config.grid=0.0,0.5`, `--config.tasks="('lee', 'wordsim353')"`) or by
repeating the flag (`--config.tasks=lee --config.tasks=wordsim353`). Whatever is wrong (an
unknown key, a value of the wrong type, no `--workdir`) is a `UsageError` of one line naming it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import ml_collections
from absl import flags
from ml_collections import config_flags

CONFIG_PREFIX = "--config."


class UsageError(ValueError):
    """A command line that cannot run, with the one line that says why."""


class CommandLine(NamedTuple):
    """What a command runs on: its config (overrides applied) and its working directory."""

    config: ml_collections.ConfigDict
    workdir: Path


def parse(
    command: str,
    argv: Sequence[str],
    default_config: Callable[[], ml_collections.ConfigDict] | None = None,
) -> CommandLine:
    """The config and workdir of `es-jax COMMAND argv`; UsageError naming what is wrong.

    `default_config` is the command's embedded config, used when `--config` is not given; without
    one, `--config` is required.
    """
    argv = [f"es-jax {command}", *argv]
    given = config_file_argument(argv)
    if given is None and default_config is None:
        raise UsageError(f"--config FILE is required (e.g. --config configs/{command}.py).")
    flag_values = flags.FlagValues()
    try:  # config_flags raises many kinds of error, at definition and at parsing
        check_file(given)
        define_flags(flag_values, argv, given, default_config)
        flag_values(argv)
    except Exception as error:
        raise UsageError(describe(error, argv, given, default_config)) from None
    if flag_values.workdir is None:
        raise UsageError("--workdir DIR is required (where results, checkpoints and plots go).")
    return CommandLine(flag_values.config, Path(flag_values.workdir))


def define_flags(
    flag_values: flags.FlagValues,
    argv: Sequence[str],
    given: str | None,
    default_config: Callable[[], ml_collections.ConfigDict] | None,
) -> None:
    """`--config` (the given file, or the embedded config) with its overrides, and `--workdir`."""
    if given is None:
        config_flags.DEFINE_config_dict(
            "config", default_config(), "the embedded config", flag_values=flag_values,
            sys_argv=argv,
        )
    else:
        config_flags.DEFINE_config_file(
            "config", None, "an ml_collections config file", flag_values=flag_values,
            sys_argv=argv,
        )
    flags.DEFINE_string("workdir", None, "where results go", flag_values=flag_values)


def config_file_argument(argv: Sequence[str]) -> str | None:
    """The value of `--config FILE` / `--config=FILE` on the command line, if given."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config":
            if i + 1 == len(argv):
                raise UsageError("--config needs a FILE[:variant] after it.")
            return argv[i + 1]
    return None


def check_file(given: str | None) -> None:
    """Refuses a `--config` argument that names no file or no `get_config`."""
    if given is None:
        return
    file = Path(given.split(":", 1)[0])
    if not file.is_file():
        raise UsageError(f"--config {given}: no such file.")
    if "def get_config" not in file.read_text():
        raise UsageError(f"--config {given}: the file defines no get_config().")


def describe(
    error: Exception,
    argv: Sequence[str],
    given: str | None,
    default_config: Callable[[], ml_collections.ConfigDict] | None,
) -> str:
    """One line for a failed parse: the override it concerns, or the error's own first line."""
    if isinstance(error, UsageError):
        return str(error)
    try:
        config = default_config() if given is None else load_config(given)
    except Exception as load_error:
        return f"--config {given}: {first_line(root_cause(load_error))}"
    for arg in argv[1:]:
        if arg.startswith(CONFIG_PREFIX):
            dotted = arg[len(CONFIG_PREFIX):].split("=", 1)[0]
            missing = unknown_key(config, dotted)
            if missing:
                return missing
    text = first_line(error).removeprefix("flag ")
    return text if text.startswith("--") else f"{' '.join(argv[1:])}: {text}"


def unknown_key(config: ml_collections.ConfigDict, dotted: str) -> str | None:
    """What is wrong with `--config.<dotted>` if its key does not exist, else None."""
    node: object = config
    keys = dotted.split(".")
    for i, key in enumerate(keys):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {'.'.join([*keys[:i], close[0]])!r}?)" if close else ""
            name = ".".join(keys[: i + 1])
            return f"--config.{dotted}: unknown config key {name!r}{hint}; known here: {known}."
        node = node[key]
    return None


def first_line(error: Exception) -> str:
    """The first non-empty line of an error's message, without quotes around a bare name."""
    lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0].strip("'\"")


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception an error was raised from (config_flags wraps a file's own)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def load_config(given: str) -> ml_collections.ConfigDict:
    """`get_config(variant)` of a `FILE[:variant]` argument, loaded as config_flags loads it."""
    argv = ["es-jax", "--config", given]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def help_text(
    command: str,
    summary: str,
    argv: Sequence[str],
    default_config: Callable[[], ml_collections.ConfigDict] | None,
) -> str:
    """`es-jax COMMAND --help`: the shape of the command line and the config's keys with values."""
    optional = "[--config FILE[:variant]]" if default_config else "--config FILE[:variant]"
    lines = [
        f"usage: es-jax {command} {optional} --workdir DIR [--config.KEY=VALUE ...]",
        "",
        summary,
        "",
    ]
    given = config_file_argument(["", *argv])
    if given is None and default_config is None:
        lines.append("Give --config FILE to list its keys.")
        return "\n".join(lines)
    config = default_config() if given is None else load_config(given)
    lines.append(f"config keys ({'embedded default' if given is None else given}):")
    lines += [f"  --config.{key}={value!r}" for key, value in flat_items(config)]
    return "\n".join(lines)


def flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of a config, nested dicts flattened, in key order."""
    items = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            items += flat_items(value, f"{prefix}{key}.")
        else:
            plain = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
            items.append((f"{prefix}{key}", plain))
    return items
