"""The import rules between the packages, checked on the source (no import runs).

Every ``import`` and ``from ... import`` in ``src/pygirder`` is read with :mod:`ast`,
including the ones inside functions (a lazy import is still a dependency), and
resolved to the ``pygirder`` module it names.  The rules say which way the layers
point: the data model below execution, the command line on top of everything, and
the code that runs on a cloud instance free of the operator's tooling.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "pygirder"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _ours(name: str) -> bool:
    return name == "pygirder" or name.startswith("pygirder.")


@cache
def imports() -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """Module -> (the ``pygirder`` modules it names, those plus ``x.y`` for every
    ``from x import y``, since ``y`` may be a submodule)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    out = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        named: set[str] = set()
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                named.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                named.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        named = {m for m in named if _ours(m)}
        out[name] = (frozenset(named), frozenset(named | {m for m in found if _ours(m)}))
    return out


def import_graph() -> dict[str, frozenset[str]]:
    """Module -> every ``pygirder`` module (or name) it imports."""
    return {name: both for name, (_, both) in imports().items()}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def offenders(importers: str | tuple[str, ...], imported: tuple[str, ...], *, but=()) -> list:
    importers = (importers,) if isinstance(importers, str) else importers
    return sorted(
        f"{src} imports {dst}"
        for src, targets in import_graph().items()
        if any(within(src, i) for i in importers) and not any(within(src, b) for b in but)
        for dst in targets
        if any(within(dst, i) for i in imported)
    )


def test_the_graph_sees_relative_lazy_and_absolute_imports() -> None:
    graph = import_graph()
    assert "pygirder.cloud.aws" in graph["pygirder.cloud.leftovers"]  # from .aws import
    assert "pygirder.service" in graph["pygirder.cloud.instance.agent"]  # from ...service
    assert "pygirder.cloud.fleet" in graph["pygirder.dashboard.app"]  # inside a function
    assert len(graph) > 50


def test_every_module_an_import_names_exists() -> None:
    # A relative import one dot short or long still parses; only running it would fail.
    known = set(imports())
    missing = sorted(
        f"{src} imports {dst}" for src, (named, _) in imports().items() for dst in named
        if dst not in known
    )  # fmt: skip
    assert missing == []


@pytest.mark.parametrize("core", ["calls", "codec", "hashing", "errors"])
def test_the_data_model_imports_nothing_of_execution(core: str) -> None:
    assert offenders(f"pygirder.{core}", ("pygirder.grid",)) == []


def test_only_the_command_lines_import_the_command_line() -> None:
    entry = ("pygirder.cli", "pygirder.cloud.cli", "pygirder.__main__")
    assert offenders("pygirder", ("pygirder.cli",), but=entry) == []


def test_nothing_below_the_command_lines_imports_the_clouds_commands() -> None:
    entry = ("pygirder.cli", "pygirder.cloud.cli", "pygirder.__main__")
    assert offenders("pygirder", ("pygirder.cloud.cli",), but=entry) == []


def test_code_on_an_instance_needs_none_of_the_operators_tooling() -> None:
    operator = (
        "pygirder.cloud.account",
        "pygirder.cloud.fleet",
        "pygirder.cloud.sim",
        "pygirder.cloud.cli",
        "pygirder.cloud.leftovers",
        "pygirder.cloud.image",
        "pygirder.cloud.config",
    )
    assert offenders("pygirder.cloud.instance", operator) == []


def test_the_core_does_not_import_the_cloud() -> None:
    # The dashboard asks the fleet code for its rows; the command lines drive it.
    above = ("pygirder.cloud", "pygirder.cli", "pygirder.dashboard")
    assert offenders("pygirder", ("pygirder.cloud",), but=above) == []


def test_no_module_is_loaded_by_a_name_in_a_string() -> None:
    loaded = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).startswith("pygirder")
            ):
                loaded.append(f"{module_name(path)}:{node.lineno}")
    assert loaded == []
