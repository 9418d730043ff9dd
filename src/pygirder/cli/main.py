"""The `pygirder` command: grid services, one-off calls, the demo, and `cloud`."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated

import typer

app = typer.Typer(
    name="pygirder",
    help="Run pure Python functions on a grid of workers coordinated by Valkey/Redis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_URL = "redis://127.0.0.1:6379/0"
RedisOpt = Annotated[
    str,
    typer.Option("--redis", envvar="PYGIRDER_REDIS", help="URL of the grid's Redis/Valkey server."),
]
NamespaceOpt = Annotated[
    str,
    typer.Option("--namespace", envvar="PYGIRDER_NAMESPACE", help="Grid namespace (key prefix)."),
]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def worker(
    redis: RedisOpt = DEFAULT_URL,
    pool: Annotated[str, typer.Option(help="Pool this worker serves.")] = "default",
    processes: Annotated[str, typer.Option(help="Worker processes: a number or 'auto'.")] = "1",
    import_: Annotated[
        list[str] | None,
        typer.Option("--import", help="Module defining grid functions (repeatable)."),
    ] = None,
    namespace: NamespaceOpt = "default",
    auto_import: Annotated[
        bool, typer.Option(help="Import a function's module on first use (trusted grids only).")
    ] = False,
    main_path: Annotated[
        str | None, typer.Option(help="The client's script, loaded as __mp_main__.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR.")] = "WARNING",
) -> None:
    """Serve a pool: run grid calls from its queue (one process per core with 'auto')."""
    from ..grid.supervisor import Supervisor, child_command, parse_processes

    _setup_logging(log_level)
    n = parse_processes(processes)
    imports = tuple(import_ or ())
    if n > 1:
        argv = ["worker", "--redis", redis, "--pool", pool, "--namespace", namespace,
                "--processes", "1", "--log-level", log_level]  # fmt: skip
        for module in imports:
            argv += ["--import", module]
        if auto_import:
            argv.append("--auto-import")
        if main_path:
            argv += ["--main-path", main_path]
        raise typer.Exit(Supervisor(child_command(argv), n).run())
    from ..grid.worker import run_worker

    run_worker(
        redis, pool=pool, namespace=namespace, imports=imports, auto_import=auto_import,
        main_path=main_path,
    )  # fmt: skip


@app.command()
def server(
    port: Annotated[int, typer.Option(help="TCP port.")] = 6379,
    bind: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    password_file: Annotated[
        str | None, typer.Option(help="File holding the password clients must give.")
    ] = None,
    dir: Annotated[
        str | None, typer.Option(help="Working directory (default: a temp dir).")
    ] = None,
    persist: Annotated[bool, typer.Option(help="Keep RDB snapshots in --dir.")] = False,
) -> None:
    """Run a Valkey server for a multi-machine grid, in the foreground."""
    import signal
    import threading

    from ..server import EmbeddedServer

    password = None
    if password_file:
        with open(password_file) as fh:
            password = fh.read().strip()
    srv = EmbeddedServer(port=port, bind=bind, password=password, dir=dir, persist=persist)
    srv.start()
    shown = srv.url.replace(f":{password}@", ":***@") if password else srv.url
    typer.echo(f"valkey serving at {shown} (Ctrl-C to stop)")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.is_set() and srv.is_running():
            stop.wait(0.5)
    finally:
        srv.stop()


@app.command()
def submit(
    target: Annotated[str, typer.Argument(help="MODULE:FUNCTION of a grid function.")],
    args: Annotated[str, typer.Option(help="JSON list of positional arguments.")] = "[]",
    kwargs: Annotated[str, typer.Option(help="JSON object of keyword arguments.")] = "{}",
    redis: Annotated[
        str | None,
        typer.Option("--redis", envvar="PYGIRDER_REDIS", help="Grid URL (default: private grid)."),
    ] = None,
    namespace: NamespaceOpt = "default",
    workers: Annotated[
        int | None, typer.Option(help="Local workers to start (default: per core without --redis).")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait.")] = None,
) -> None:
    """Run one call from the shell and print its result as JSON."""
    import importlib

    import pygirder

    from ..calls import GridFunction

    module_name, _, func_name = target.partition(":")
    if not module_name or not func_name:
        raise typer.BadParameter(
            "expected MODULE:FUNCTION, e.g. mypkg.jobs:price", param_hint="TARGET"
        )
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise typer.BadParameter(
            f"cannot import {module_name!r}: {exc}", param_hint="TARGET"
        ) from None
    func = getattr(module, func_name, None)
    if not isinstance(func, GridFunction):
        raise typer.BadParameter(
            f"{target} is not a grid function (decorate it with @pygirder.fn)", param_hint="TARGET"
        )
    try:
        pos = json.loads(args)
        kw = json.loads(kwargs)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}") from None
    if not isinstance(pos, list) or not isinstance(kw, dict):
        raise typer.BadParameter("--args takes a JSON list and --kwargs a JSON object")
    with pygirder.connect(redis, namespace=namespace, workers=workers) as grid:
        try:
            result = grid.run(func(*pos, **kw), timeout=timeout)
        except pygirder.RemoteError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(1) from None
    typer.echo(json.dumps(result, default=repr))


@app.command()
def demo(
    depth: Annotated[int, typer.Option(help="Depth of the fan-out tree.")] = 6,
    fanout: Annotated[int, typer.Option(help="Children per node of the tree.")] = 4,
    leaf_ms: Annotated[float, typer.Option(help="CPU work per leaf, in milliseconds.")] = 0.2,
    steps: Annotated[int, typer.Option(help="Steps of the shared-sub-call lattice.")] = 60,
    workers: Annotated[
        int | None, typer.Option(help="Local workers (default: one per core).")
    ] = None,
) -> None:
    """The main job on a private grid: a re-entrant tree and a lattice of shared sub-calls."""
    from ..demo import run_demo

    ok = run_demo(depth=depth, fanout=fanout, leaf_ms=leaf_ms, steps=steps, workers=workers)
    raise typer.Exit(0 if ok else 1)


def _mount_optional() -> None:
    """Sub-command groups that live in their own modules."""
    try:
        from ..cloud.cli import app as cloud_app
    except ImportError:  # pragma: no cover - a partial install
        return
    app.add_typer(cloud_app, name="cloud", help="AWS: account setup, image, artifacts, fleet.")


def main() -> None:
    _mount_optional()
    from ..errors import PygirderError

    try:
        app()
    except PygirderError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
