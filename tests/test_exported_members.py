"""``pygirder.__all__`` is exactly what the package exports, and each name is documented."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pygirder

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_all_is_what_the_package_exports():
    # As httpx's test: every public attribute that is not a module is in __all__, and
    # nothing else is (submodules such as pygirder.calls are attributes, not exports).
    public = sorted(
        (
            name
            for name, value in vars(pygirder).items()
            if (not name.startswith("_") or name == "__version__")
            and not isinstance(value, types.ModuleType)
        ),
        key=str.casefold,
    )
    assert sorted(pygirder.__all__, key=str.casefold) == public
    assert len(set(pygirder.__all__)) == len(pygirder.__all__)


def test_every_exported_name_is_importable_and_presented_as_pygirder():
    for name in pygirder.__all__:
        namespace: dict[str, object] = {}
        exec(f"from pygirder import {name}", namespace)  # the import users write
        value = namespace[name]
        if isinstance(value, type | types.FunctionType):
            assert value.__module__ == "pygirder", name


def test_docs_api_lists_exactly_all():
    documented = set(re.findall(r"^::: pygirder\.(\w+)$", API_MD.read_text(), re.MULTILINE))
    assert documented == {n for n in pygirder.__all__ if not n.startswith("__")}
