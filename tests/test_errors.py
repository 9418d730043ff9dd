"""The exception tree drawn in pygirder.errors' docstring is the real class hierarchy."""

from __future__ import annotations

import re

import pygirder
from pygirder import errors

# Met only inside the command line, the dashboard and the worker, so not exported.
INTERNAL = {"CallLookupError", "ImportRefused"}


def drawn_tree() -> dict[str, str | None]:
    """Each class named in the docstring's drawing, with the class drawn as its parent."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []  # (column of the name, name), outermost first
    for line in (errors.__doc__ or "").splitlines():
        match = re.match(r"^([\s│├└─]*)([A-Z]\w+)\b", line)
        if not match or not re.search(r"[├└]── $|^ +$", match.group(1)):
            continue
        column = len(match.group(1))
        while stack and stack[-1][0] >= column:
            stack.pop()
        parents[match.group(2)] = stack[-1][1] if stack else None
        stack.append((column, match.group(2)))
    return parents


def exception_classes() -> dict[str, type[BaseException]]:
    return {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ in (errors.__name__, "pygirder")
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
