"""One grid call from the command line, as `pygirder submit` and `pygirder cloud run` make it.

Both commands name a grid function as ``MODULE:FUNCTION``, take its arguments as
JSON and print its result as JSON (or, with ``--json``, the service envelope):
the options, their checks and the waiting live here once.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from .service import ServiceContext

__all__ = [
    "ArgsOpt",
    "KwargsOpt",
    "TargetArg",
    "load_grid_function",
    "parse_call_arguments",
    "print_json",
    "run_one_call",
]

TargetArg = Annotated[str, typer.Argument(help="MODULE:FUNCTION of a grid function.")]
ArgsOpt = Annotated[str, typer.Option(help="JSON list of positional arguments.")]
KwargsOpt = Annotated[str, typer.Option(help="JSON object of keyword arguments.")]


def print_json(result: object) -> None:
    """How a call's result prints without --json: one JSON line."""
    typer.echo(json.dumps(result, default=repr))


def load_grid_function(target: str, search_path: str) -> object:
    """The grid function ``MODULE:FUNCTION`` names, importing MODULE from ``search_path``.

    Raises ``typer.BadParameter`` (exit 2, no traceback) for every user mistake.
    """
    import importlib

    from ..calls import GridFunction

    module_name, _, func_name = target.partition(":")
    if not module_name or not func_name:
        raise typer.BadParameter(
            f"expected MODULE:FUNCTION, e.g. mypkg.jobs:price, not {target!r}",
            param_hint="TARGET",
        )
    if search_path not in sys.path:
        sys.path.insert(0, search_path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise typer.BadParameter(
            f"cannot import {module_name!r}: {exc} (modules are looked up in {search_path} "
            "and on PYTHONPATH)",
            param_hint="TARGET",
        ) from None
    func = getattr(module, func_name, None)
    if not isinstance(func, GridFunction):
        what = "does not exist" if func is None else "is not a grid function"
        raise typer.BadParameter(
            f"{target} {what}: name a function decorated with @pygirder.fn",
            param_hint="TARGET",
        )
    return func


def parse_call_arguments(args: str, kwargs: str) -> tuple[list, dict]:
    """``--args`` (a JSON list) and ``--kwargs`` (a JSON object), checked."""
    try:
        pos = json.loads(args)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="--args") from None
    try:
        kw = json.loads(kwargs)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="--kwargs") from None
    if not isinstance(pos, list):
        raise typer.BadParameter("takes a JSON list, e.g. '[2, 3]'", param_hint="--args")
    if not isinstance(kw, dict):
        raise typer.BadParameter("takes a JSON object, e.g. '{\"x\": 1}'", param_hint="--kwargs")
    return pos, kw


def run_one_call(ctx: ServiceContext, grid: object, call: object, timeout: float | None) -> object:
    """``grid.run(call)`` for a command: a failed call's remote error is printed whole
    (its traceback and call chain), and an interrupt says what became of the call."""
    import pygirder

    try:
        return grid.run(call, timeout=timeout)  # type: ignore[attr-defined]
    except pygirder.RemoteError as exc:
        if ctx.json:
            raise
        typer.echo(str(exc), err=True)  # the remote traceback, as it was
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise pygirder.PygirderError(
            f"interrupted by {ctx.stop_signal or 'SIGINT'} before the result came; a call "
            "that had started still finishes and is memoized, so running the command "
            "again picks its result up"
        ) from None
