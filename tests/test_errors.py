"""The exception trees drawn in pygirder.errors' and pygirder.cloud.errors' docstrings
are the real class hierarchies, and no other module defines a pygirder exception."""

from __future__ import annotations

import importlib
import pkgutil
import re
from types import ModuleType

import pygirder
from pygirder import errors
from pygirder.cloud import errors as cloud_errors

# Met only inside the command line, the dashboard and the worker, so not exported.
INTERNAL = {"CallLookupError", "ImportRefused"}


def drawn_tree(module: ModuleType = errors) -> dict[str, str | None]:
    """Each class named in the docstring's drawing, with the class drawn as its parent."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []  # (column of the name, name), outermost first
    for line in (module.__doc__ or "").splitlines():
        match = re.match(r"^([\s│├└─]*)([A-Z]\w+)\b", line)
        if not match or not re.search(r"[├└]── $|^ +$", match.group(1)):
            continue
        column = len(match.group(1))
        while stack and stack[-1][0] >= column:
            stack.pop()
        parents[match.group(2)] = stack[-1][1] if stack else None
        stack.append((column, match.group(2)))
    return parents


def exception_classes(module: ModuleType = errors) -> dict[str, type[BaseException]]:
    return {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ in (module.__name__, "pygirder")
    }


def test_every_error_class_is_drawn_under_its_real_base():
    tree = drawn_tree()
    classes = exception_classes()
    assert set(tree) == set(classes), "draw every class of pygirder.errors in its docstring"
    for name, cls in classes.items():
        parent = tree[name]
        if parent is None:
            assert cls is errors.PygirderError
        else:
            assert cls.__bases__[0] is classes[parent], f"{name} is drawn under {parent}"


def test_the_errors_users_meet_are_exported():
    assert set(exception_classes()) - INTERNAL <= set(pygirder.__all__)
    assert INTERNAL.isdisjoint(pygirder.__all__)


def test_every_cloud_error_is_drawn_under_its_real_base():
    tree = drawn_tree(cloud_errors)
    classes = {
        name: cls
        for name, cls in exception_classes(cloud_errors).items()
        if cls.__module__ == cloud_errors.__name__
    }
    core = {name for name, parent in tree.items() if parent is None}
    assert core == {"PygirderError", "ConfigError"}, "the cloud's tree hangs off the core's"
    assert set(tree) - core == set(classes), "draw every class of cloud/errors.py"
    for name, cls in classes.items():
        assert cls.__bases__[0].__name__ == tree[name], f"{name} is drawn under {tree[name]}"


def test_no_other_module_defines_a_pygirder_error():
    homes = {errors.__name__, cloud_errors.__name__}
    elsewhere = []
    for info in pkgutil.walk_packages(pygirder.__path__, "pygirder."):
        if info.name.endswith("__main__"):
            continue  # runs the command line
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, errors.PygirderError)
                and value.__module__ == info.name
                and info.name not in homes
            ):
                elsewhere.append(f"{info.name}.{name}")
    assert not elsewhere, "define pygirder's exceptions in errors.py or cloud/errors.py"
