"""The one command line every `es-jax` command reads, parsed with `ml_collections.config_flags`.

    es-jax COMMAND --config FILE[:variant] --workdir DIR [--config.key=value ...]

`FILE` is a Python file whose `get_config(variant)` returns a ConfigDict; `FILE:tiny` passes
"tiny". A command with an embedded default config makes `--config` optional. Overrides follow
config_flags: a value is read with the type of the value it replaces; a tuple is written as a
Python literal (`--config.grid=0.0,0.5`, `--config.tasks="('lee', 'wordsim353')"`) or by
repeating the flag (`--config.tasks=lee --config.tasks=wordsim353`). Whatever is wrong (a config
file that does not load or whose `get_config` fails or returns no ConfigDict, an unknown key, a
value of the wrong type, no `--workdir`, a workdir that is a file or cannot be written) is a
`UsageError` of one line naming it, raised before any work.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import ml_collections
from absl import flags
from etils import epath
from ml_collections import config_flags

CONFIG_PREFIX = "--config."
CONFIG_MODULE = "es_jax_config_file"  # the name a loaded config file's module runs under
BUCKET_URL = re.compile(r"(gs|s3|az)://[^/]+(/.*)?")  # workdirs on buckets, as etils.epath reads
BUCKET_TYPO = re.compile(r"(gs|s3|az):/(?!/)")  # gs:/bucket: a URL that lost a slash


class UsageError(ValueError):
    """A command line that cannot run, with the one line that says why."""


class CommandLine(NamedTuple):
    """What a command runs on: its config (overrides applied) and its working directory."""

    config: ml_collections.ConfigDict
    workdir: epath.Path


def parse(
    command: str,
    argv: Sequence[str],
    default_config: Callable[[], ml_collections.ConfigDict] | None = None,
) -> CommandLine:
    """The config and workdir of `es-jax COMMAND argv`; UsageError naming what is wrong.

    `default_config` is the command's embedded config, used when `--config` is not given; without
    one, `--config` is required. The workdir is checked (`check_workdir`) before any work.
    """
    argv = [f"es-jax {command}", *argv]
    given = config_file_argument(argv)
    if given is None and default_config is None:
        raise UsageError(f"--config FILE is required (e.g. --config configs/{command}.py).")
    config = default_config() if given is None else load_config(given)
    argv = without_config_file(argv)
    pristine = copy.deepcopy(config)
    flag_values = flags.FlagValues()
    try:  # config_flags raises many kinds of error, at definition and at parsing
        define_flags(flag_values, argv, config)
        extra = flag_values(argv)[1:]
    except Exception as error:
        raise UsageError(describe(error, argv, pristine)) from None
    if extra:
        raise UsageError(
            f"unexpected argument {extra[0]!r}; every setting is a flag: --config FILE[:variant], "
            "--workdir DIR or --config.KEY=VALUE."
        )
    if flag_values.workdir is None:
        raise UsageError("--workdir DIR is required (where results, checkpoints and plots go).")
    check_tuple_types(pristine, flag_values["config"].override_values)
    return CommandLine(flag_values.config, check_workdir(flag_values.workdir))


def define_flags(
    flag_values: flags.FlagValues, argv: Sequence[str], config: ml_collections.ConfigDict
) -> None:
    """`--config` (the loaded config, overridable key by key) and `--workdir`."""
    config_flags.DEFINE_config_dict(
        "config", config, "the config", flag_values=flag_values, sys_argv=list(argv)
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


def without_config_file(argv: Sequence[str]) -> list[str]:
    """`argv` without its `--config FILE` / `--config=FILE` (the file is loaded already)."""
    kept: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == "--config":
            skip_next = True
        elif not arg.startswith("--config="):
            kept.append(arg)
    return kept


# ----------------------------------------------------------------------------------------------
# Config files.


def load_config(given: str) -> ml_collections.ConfigDict:
    """`get_config(variant)` of a `FILE[:variant]` argument; UsageError naming what is wrong."""
    path, *variant = given.split(":", 1)
    module = config_module(given, Path(path))
    call = f"get_config({variant[0]!r})" if variant else "get_config()"
    try:
        config = module.get_config(*variant)
    except ValueError as error:  # the file's own refusal, e.g. an unknown variant
        raise UsageError(f"--config {given}: {first_line(error)}") from None
    except Exception as error:
        raise UsageError(
            f"--config {given}: {call} raised {type(error).__name__}: {first_line(error)}"
            f"{place_in(error, path)}; fix the file."
        ) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise UsageError(
            f"--config {given}: {call} returned {kind_of(config)}, not an "
            "ml_collections.ConfigDict; make it build one and `return config`."
        )
    return config


def config_module(given: str, path: Path) -> ModuleType:
    """The Python module of a config file, executed; UsageError if it cannot be."""
    if path.is_dir():
        raise UsageError(f"--config {given}: is a directory; give a config .py file.")
    if not path.is_file():
        raise UsageError(f"--config {given}: no such file.")
    spec = importlib.util.spec_from_file_location(CONFIG_MODULE, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"--config {given}: not a Python file; give a config .py file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[CONFIG_MODULE] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise UsageError(
            f"--config {given}: syntax error in {same_or(error.filename, path)} "
            f"line {error.lineno}: {error.msg}; fix the file."
        ) from None
    except Exception as error:
        raise UsageError(
            f"--config {given}: loading the file raised {type(error).__name__}: "
            f"{first_line(error)}{place_in(error, path)}; fix the file."
        ) from None
    if not callable(getattr(module, "get_config", None)):
        raise UsageError(
            f"--config {given}: the file defines no get_config(); add "
            "`def get_config(variant=''):` returning an ml_collections.ConfigDict."
        )
    return module


def kind_of(value: object) -> str:
    """`None`, or the type name of a value (what a get_config returned)."""
    return "None" if value is None else type(value).__name__


def same_or(filename: str | None, path: Path) -> str:
    """`path` as the user gave it when `filename` is that file, else `filename`."""
    same = filename is not None and os.path.realpath(filename) == os.path.realpath(path)
    return str(path) if same else str(filename)


def place_in(error: BaseException, path: str | Path) -> str:
    """` (FILE line N)`: the last line of the config file the error passed through, or ''."""
    target = os.path.realpath(path)
    lines = [
        frame.lineno
        for frame in traceback.extract_tb(error.__traceback__)
        if os.path.realpath(frame.filename) == target
    ]
    return f" ({path} line {lines[-1]})" if lines else ""


# ----------------------------------------------------------------------------------------------
# What is wrong with a command line.


def describe(error: Exception, argv: Sequence[str], config: ml_collections.ConfigDict) -> str:
    """One line for a failed parse: the argument it concerns and what is wrong with it."""
    if isinstance(error, UsageError):
        return str(error)
    if isinstance(error, flags.UnrecognizedFlagError):
        return (
            f"{error.flagvalue or '--' + error.flagname}: unknown flag; the flags are "
            "--config FILE[:variant], --workdir DIR and --config.KEY=VALUE."
        )
    for arg in argv[1:]:
        if arg.startswith(CONFIG_PREFIX):
            dotted = arg[len(CONFIG_PREFIX):].split("=", 1)[0]
            wrong = unknown_key(config, dotted) or group_key(config, dotted)
            if wrong:
                return wrong
    text = first_line(error).removeprefix("flag ")
    if text.startswith("--"):
        return text
    named = [arg for arg in argv[1:] if arg.split("=", 1)[0] in text]
    return f"{named[-1] if named else ' '.join(argv[1:])}: {text}"


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


def group_key(config: ml_collections.ConfigDict, dotted: str) -> str | None:
    """What is wrong with `--config.<dotted>=VALUE` if the key holds a group of keys, else None."""
    node = config
    for key in dotted.split("."):
        node = node[key]
    if not isinstance(node, ml_collections.ConfigDict):
        return None
    return (
        f"--config.{dotted}: {dotted!r} is a group of keys, not a value; set one of its keys, "
        f"--config.{dotted}.KEY=VALUE with KEY in {sorted(node.keys())}."
    )


def check_tuple_types(config: ml_collections.ConfigDict, overrides: dict[str, object]) -> None:
    """Refuses a tuple override whose items are not of the type of the tuple it replaces."""
    for dotted, value in overrides.items():
        old = config
        for key in dotted.split("."):
            old = old[key]
        wanted = {type(item) for item in old} if isinstance(old, tuple) else set()
        if len(wanted) != 1 or not isinstance(value, tuple):
            continue
        kind = wanted.pop()
        allowed = (int, float) if kind is float else (kind,)
        wrong = [item for item in value if type(item) not in allowed]
        if wrong:
            example = ",".join(repr(item) if kind is str else str(item) for item in old[:2])
            raise UsageError(
                f"--config.{dotted}: {wrong[0]!r} is not of type {kind.__name__}; the key holds a "
                f"tuple of {kind.__name__} (e.g. --config.{dotted}={example})."
            )


# ----------------------------------------------------------------------------------------------
# The working directory.


def check_workdir(workdir: str | os.PathLike) -> epath.Path:
    """`workdir` as an `etils.epath.Path` once it is a writable directory or can be created;
    UsageError if not.

    Nothing is created: a missing local workdir's nearest existing parent must be a writable
    directory. A bucket URL (`gs://BUCKET/PATH`, or s3:// or az://) is kept exactly as given,
    its form checked (`check_bucket_url`) but not its bucket, which may be out of reach here.
    """
    name = os.fspath(workdir)
    if not name.strip():
        raise UsageError("--workdir is empty; give the directory where results go.")
    if "://" in name or BUCKET_TYPO.match(name):
        return epath.Path(check_bucket_url(name))
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(
            f"--workdir {name}: is a file, not a directory; give a directory (it is created "
            "if missing)."
        )
    existing = nearest_existing(path.absolute())
    if not existing.is_dir():
        raise UsageError(
            f"--workdir {name}: cannot be created, because {existing} is a file; give a "
            "directory path."
        )
    problem = write_problem(existing)
    if problem:
        where = "" if existing == path.absolute() else f"is in {existing}, which "
        raise UsageError(
            f"--workdir {name}: {where}is not writable ({problem}); give a directory you can "
            "write to."
        )
    return epath.Path(path)


def check_bucket_url(name: str) -> str:
    """`name` if it is a bucket URL `SCHEME://BUCKET[/PATH]` of a scheme `etils.epath` writes
    (gs, s3, az); UsageError naming it if not (another scheme, no bucket, one slash)."""
    if not BUCKET_URL.fullmatch(name):
        raise UsageError(
            f"--workdir {name}: not a bucket URL; give a local directory or "
            "gs://BUCKET/PATH (or s3://, az://)."
        )
    return name


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its nearest parent that does."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_problem(directory: Path) -> str | None:
    """Why no file can be written in `directory` (the OS's reason), or None if one can."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as error:
        return error.strerror or type(error).__name__


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message, without quotes around a bare name."""
    lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    line = lines[0].strip()
    quoted = len(line) > 1 and line[0] == line[-1] and line[0] in "'\""
    return line[1:-1] if quoted else line


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


def mesh_settings(data: int = -1, fsdp: int = 1) -> ml_collections.ConfigDict:
    """The `mesh` keys of every command's config: devices along the `data` axis and the `fsdp`
    axis (which also shards parameters); -1 takes the devices the other leaves (es_jax.mesh)."""
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})
