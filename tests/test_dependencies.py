"""Every package es_jax imports is declared in pyproject.toml, as a dependency or in an extra."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]
FIRST_PARTY = "es_jax"


def imported_top_level_names(source: str) -> set[str]:
    """Top-level names of a module's absolute imports, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            names.add(node.module.partition(".")[0])
    return names


def canonical(distribution: str) -> str:
    """A distribution name normalised as PEP 503 does: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def requirement_name(requirement: str) -> str:
    """The canonical distribution name of a PEP 508 requirement ("jax>=0.10" -> "jax")."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match is not None, f"unreadable requirement {requirement!r} in pyproject.toml"
    return canonical(match.group(1))


def declared_distributions() -> set[str]:
    """Canonical names of pyproject's dependencies and of every optional extra's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    return {requirement_name(r) for r in requirements}


def third_party_imports() -> dict[str, list[str]]:
    """Each imported third-party top-level name, with the files of es_jax that import it."""
    importers: dict[str, list[str]] = {}
    for path in sorted((ROOT / FIRST_PARTY).rglob("*.py")):
        for name in imported_top_level_names(path.read_text()):
            if name != FIRST_PARTY and name not in sys.stdlib_module_names:
                importers.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return importers


def test_imported_names_include_lazy_and_skip_relative_imports():
    source = (
        "import a.b as c\nfrom d.e import f\nfrom . import g\nfrom .h import i\n"
        "def lazy():\n    import j\n    from k import l\n"
    )
    assert imported_top_level_names(source) == {"a", "d", "j", "k"}


def test_every_imported_package_is_declared():
    providers = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    problems = []
    for name, files in sorted(third_party_imports().items()):
        distributions = {canonical(d) for d in providers.get(name, [])}
        if not distributions:
            problems.append(f"{name} (imported by {', '.join(files)}) is not installed here, "
                            "so its distribution is unknown; install the extra that provides it")
        elif not distributions & declared:
            problems.append(f"{name} (imported by {', '.join(files)}) comes from "
                            f"{' or '.join(sorted(distributions))}, not in pyproject.toml")
    assert not problems, "\n".join(problems)
