"""``pygirder cache``: look into and prune the durable result store.

Each command works on the store ``--store`` names (default: ``PYGIRDER_STORE``, else
the local store in the user's cache folder) and, with ``--json``, prints the service
envelope so scripts can parse it.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Annotated, Any

import typer

from ..errors import ConfigError
from .service import ServiceContext, service

__all__ = ["app"]

app = typer.Typer(
    name="cache",
    help="The durable result store: what it holds, pruning, single results.",
    no_args_is_help=True,
    add_completion=False,
)

StoreOpt = Annotated[
    str,
    typer.Option(
        "--store",
        envvar="PYGIRDER_STORE",
        help="The store: a folder or s3://bucket/prefix (default: the user cache folder).",
    ),
]
# Request ids are long hashes; this many characters tell them apart on screen.
ID_CHARS = 16


def _open(spec: str) -> Any:
    from ..results import open_store, resolve_store

    store = open_store(spec or None)
    if store is None:
        raise ConfigError(
            f"the result store is off ({spec or 'PYGIRDER_STORE'}={resolve_store(spec) or 'off'}); "
            "give one with --store FOLDER or --store s3://bucket/prefix"
        )
    return store


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


# ------------------------------------------------------------------------ stats


def _print_stats(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"result store {report['url']}", show_header=False)
    rate = report["hit_rate"]
    lookups = (report["hits"] or 0) + (report["misses"] or 0)
    for label, value in (
        ("objects", f"{report['objects']:,}"),
        ("bytes", _size(report["bytes"])),
        ("cap", _size(report["max_bytes"]) if report["max_bytes"] else "none"),
        ("hit rate", "-" if rate is None else f"{rate:.1%} of {lookups:,} lookups"),
        ("oldest", _when(report["oldest"])),
        ("newest", _when(report["newest"])),
    ):
        table.add_row(label, value)
    Console().print(table)


@service(app, render=_print_stats)
def stats(store: StoreOpt = "") -> dict[str, Any]:
    """What the store holds: objects, bytes, hit rate, oldest and newest result.

    The hit rate counts lookups by every process using a local store; S3 keeps no
    count (see the grid's `restored` in `pygirder status`).
    """
    with _open(store) as opened:
        return opened.stats().to_dict()  # type: ignore[no-any-return]


# ------------------------------------------------------------------------ ls


def _print_ls(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['shown']:,} of {report['matched']:,} results")
    for column in ("id", "function", "size", "stored", "used"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for row in report["results"]:
        name = row["function"] + (" [red](error)[/]" if row["error"] else "")
        table.add_row(row["id"][:ID_CHARS], name, _size(row["size"]), _when(row["created"]),
                      _when(row["accessed"]))  # fmt: skip
    Console().print(table)


@service(app, render=_print_ls)
def ls(
    store: StoreOpt = "",
    function: Annotated[
        str | None, typer.Option(help="Only results of this function (MODULE:NAME).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many, newest first (0: all).")] = 50,
) -> dict[str, Any]:
    """List stored results, newest first."""
    with _open(store) as opened:
        metas = [m for m in opened.iterate() if function is None or m.function == function]
    metas.sort(key=lambda m: m.created, reverse=True)
    shown = metas[:limit] if limit > 0 else metas
    return {"matched": len(metas), "shown": len(shown), "results": [m.to_dict() for m in shown]}


# ------------------------------------------------------------------------ prune


def _print_prune(report: dict[str, Any]) -> None:
    verb = "would remove" if report["dry_run"] else "removed"
    typer.echo(f"{verb} {report['objects']:,} results ({_size(report['bytes'])})")


def current_fingerprints(imports: list[str]) -> tuple[set[str], dict[str, str]]:
    """Import the project's modules (``MODULE`` or ``path/script.py``); returns the
    modules looked at and the fingerprint of every grid function they define."""
    import importlib
    import os

    from .. import calls
    from ..grid import loading

    modules: set[str] = set()
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for spec in imports:
        if spec.endswith(".py"):
            state = loading.load_main_script(os.path.abspath(spec))
            if state.error:
                raise ConfigError(f"--import {spec}: loading it failed: {state.error}")
            modules.add("__main__")
            continue
        try:
            importlib.import_module(spec)
        except ImportError as exc:
            raise ConfigError(f"--import {spec}: {exc}") from None
        modules.add(spec)
    fingerprints = {}
    for name in calls.registered_names():
        gf = calls.lookup(name)
        if gf is not None:
            fingerprints[name] = gf.fingerprint
    return modules, fingerprints


@service(app, render=_print_prune)
def prune(
    ctx: ServiceContext,
    store: StoreOpt = "",
    older_than: Annotated[
        str | None, typer.Option(help="Results stored longer ago than this: 90s, 30m, 2h, 7d.")
    ] = None,
    function: Annotated[
        str | None, typer.Option(help="Results of this function (MODULE:NAME).")
    ] = None,
    stale: Annotated[
        bool,
        typer.Option(
            help="Results of functions of the --import modules whose code changed or that are "
            "gone: nothing can ask for them again."
        ),
    ] = False,
    import_: Annotated[
        list[str] | None,
        typer.Option(
            "--import", help="A module (or script.py) of the project, for --stale (repeatable)."
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Only count what would be removed.")] = False,
) -> dict[str, Any]:
    """Remove results: those matching every condition given.

    With --json: the service envelope with {"objects", "bytes", "dry_run"}.
    """
    from ..grid.maintenance import parse_age

    if older_than is None and function is None and not stale:
        raise typer.BadParameter(
            "say what to prune: --older-than AGE, --function NAME and/or --stale "
            "(`pygirder cache rm ID` removes one result)"
        )
    cutoff = None
    if older_than is not None:
        try:
            cutoff = time.time() - parse_age(older_than)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc), param_hint="--older-than") from None
    modules: set[str] = set()
    fingerprints: dict[str, str] = {}
    if stale:
        if not import_:
            raise typer.BadParameter(
                "--stale compares results with the project's code: name its modules, e.g. "
                "--import mypkg.jobs (or --import script.py)",
                param_hint="--import",
            )
        modules, fingerprints = current_fingerprints(import_)

    def select(meta: Any) -> bool:
        if cutoff is not None and meta.created >= cutoff:
            return False
        if function is not None and meta.function != function:
            return False
        if stale:
            module = meta.function.partition(":")[0]
            if module not in modules or fingerprints.get(meta.function) == meta.fingerprint:
                return False
        return True

    details = function is not None or stale
    with _open(store) as opened:
        if ctx.json:
            report = opened.prune(select, details=details, dry_run=dry_run)
        else:
            from rich.console import Console
            from rich.progress import Progress

            with Progress(console=Console(stderr=True), transient=True) as bar:
                task = bar.add_task("pruning", total=None)
                report = opened.prune(
                    select, details=details, dry_run=dry_run,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )  # fmt: skip
    return {**report.to_dict(), "dry_run": dry_run}


# ------------------------------------------------------------------------ rm, get


@service(app, render=_print_prune)
def rm(
    ids: Annotated[list[str], typer.Argument(help="Request ids of the results to remove.")],
    store: StoreOpt = "",
) -> dict[str, Any]:
    """Remove single results (the next call computes them again)."""
    with _open(store) as opened:
        try:
            gone = opened.delete(ids)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="ID") from None
    return {"objects": gone, "bytes": None, "dry_run": False}


def _print_get(result: Any) -> None:
    import json

    typer.echo(json.dumps(result, default=repr))


@service(app, render=_print_get)
def get(
    request_id: Annotated[str, typer.Argument(metavar="ID", help="Request id (`call.id`).")],
    store: StoreOpt = "",
) -> Any:
    """Print one stored result as JSON (a stored error is printed to stderr, exit 1).

    A signed pickled result needs the grid's PYGIRDER_SECRET.
    """
    from ..errors import RemoteError
    from ..grid.protocol import decode_envelope
    from ..results.record import check_id

    try:
        check_id(request_id)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="ID") from None
    with _open(store) as opened:
        body = opened.get(request_id)
    if body is None:
        raise ConfigError(
            f"no result {request_id} in {opened.url} (never stored, pruned, or unusable); "
            "`pygirder cache ls` lists what is stored"
        )
    try:
        return decode_envelope(body, request_id)
    except RemoteError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
