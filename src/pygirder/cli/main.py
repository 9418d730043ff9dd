"""The `pygirder` command: grid services, one-off calls, the demo, and `cloud`."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from ..errors import PygirderError
from .oneshot import ArgsOpt, KwargsOpt, TargetArg, print_json
from .service import ServiceContext, service

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


@service(app, stop="flag")
def worker(
    ctx: ServiceContext,
    redis: RedisOpt = DEFAULT_URL,
    pool: Annotated[str, typer.Option(help="Pool this worker serves.")] = "default",
    processes: Annotated[str, typer.Option(help="Worker processes: a number or 'auto'.")] = "1",
    import_: Annotated[
        list[str] | None,
        typer.Option("--import", help="Module defining grid functions (repeatable)."),
    ] = None,
    namespace: NamespaceOpt = "default",
    allow_module: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-module",
            help="Module or package a request may name, imported on first use (repeatable).",
        ),
    ] = None,
    auto_import: Annotated[
        bool,
        typer.Option(
            help="Import any module a request names: whoever reaches the server runs code "
            "(trusted grids only)."
        ),
    ] = False,
    main_path: Annotated[
        str | None,
        typer.Option(
            help="The client's script: loaded as __mp_main__ when a request names __main__; "
            "modules in its folder may be imported on first use."
        ),
    ] = None,
    result_ttl: Annotated[
        int, typer.Option(help="Seconds results are kept (0: until `pygirder gc`).")
    ] = 0,
    max_runtime: Annotated[
        float,
        typer.Option(
            envvar="PYGIRDER_MAX_RUNTIME",
            help="Default limit in seconds on a call's computing time (0: none); "
            "@fn(max_runtime=...) overrides it.",
        ),
    ] = 0.0,
) -> dict:
    """Serve a pool: run grid calls from its queue (one process per core with 'auto')."""
    from ..grid.supervisor import Supervisor, child_command, parse_processes

    n = parse_processes(processes)
    imports = tuple(import_ or ())
    allowed = tuple(allow_module or ())
    if n > 1:
        # the URL (it may hold a password) goes through the environment, not argv: any
        # local user can read a command line in `ps`
        argv = ["worker", "--pool", pool, "--namespace", namespace,
                "--processes", "1", "--log-level", ctx.log_level,
                "--result-ttl", str(result_ttl)]  # fmt: skip
        for module in imports:
            argv += ["--import", module]
        for module in allowed:
            argv += ["--allow-module", module]
        if auto_import:
            argv.append("--auto-import")
        if main_path:
            argv += ["--main-path", main_path]
        if max_runtime:
            argv += ["--max-runtime", str(max_runtime)]
        supervisor = Supervisor(child_command(argv), n, env={**os.environ, "PYGIRDER_REDIS": redis})
        code = supervisor.run()
        return {"processes": n, "restarts": supervisor.restarts, "exit": code}
    import signal

    from ..grid.worker import run_worker
    from ..lifetime import watch_parent

    # where the parent-death signal is not available: stop when our supervisor is gone
    watch_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))
    stats = run_worker(
        redis, pool=pool, namespace=namespace, imports=imports, auto_import=auto_import,
        allow_modules=allowed,
        main_path=main_path, result_ttl=result_ttl, log_level=ctx.log_level,
        max_runtime=max_runtime,
    )  # fmt: skip
    return stats


@service(app, stop="flag")
def distributor(
    ctx: ServiceContext,
    redis: RedisOpt = DEFAULT_URL,
    pool: Annotated[str, typer.Option(help="The child pool it serves.")] = "default",
    parent: Annotated[str, typer.Option(help="The parent pool it links the child to.")] = "",
    namespace: NamespaceOpt = "default",
) -> dict:
    """Link a pool to a parent pool: volunteer its idle workers up, pass its overflow up."""
    from ..errors import ConfigError
    from ..grid.distributor import run_distributor

    if not parent:
        raise ConfigError("--parent is required: the pool this distributor links --pool to")
    return run_distributor(redis, pool=pool, parent=parent, namespace=namespace)


@service(app, stop="flag")
def server(
    ctx: ServiceContext,
    port: Annotated[int, typer.Option(help="TCP port (0: a free one).")] = 6379,
    bind: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    password_file: Annotated[
        str | None,
        typer.Option(
            help="File holding the password clients must give; created (0600) with a random "
            "password if missing (default: one in --dir)."
        ),
    ] = None,
    dir: Annotated[
        str | None, typer.Option(help="Working directory (default: a temp dir).")
    ] = None,
    persist: Annotated[bool, typer.Option(help="Keep RDB snapshots in --dir.")] = False,
    maxmemory: Annotated[
        str | None,
        typer.Option(
            help="Memory cap: 4gb, 512mb, bytes, or a share of RAM such as 50% (the default, "
            "or PYGIRDER_MAXMEMORY); 0: none. Grid state is never evicted: past the cap, "
            "submitting fails with a clear out-of-memory error."
        ),
    ] = None,
) -> dict:
    """Run a Valkey server for a multi-machine grid, in the foreground.

    It always has a password: the one in --password-file, or a random one written to a
    0600 file next to a file with the whole URL (clients: PYGIRDER_REDIS=$(cat URLFILE)).
    """
    import shutil
    import tempfile

    from ..grid.connection import redact
    from ..server import EmbeddedServer, random_password

    own_dir = dir is None
    workdir = tempfile.mkdtemp(prefix="pygirder-server-") if dir is None else dir
    os.makedirs(workdir, exist_ok=True)
    pw_path = password_file or os.path.join(workdir, "password")
    try:
        if os.path.exists(pw_path):
            with open(pw_path) as fh:
                password = fh.read().strip()
        else:
            password = random_password()
            _write_private(pw_path, password + "\n")
        srv = EmbeddedServer(
            port=port, bind=bind, password=password, dir=workdir, persist=persist,
            maxmemory=maxmemory,
        )  # fmt: skip
        srv.start()
        url_path = os.path.join(workdir, "url")
        _write_private(url_path, srv.url + "\n")
        shown = redact(srv.url)
        ctx.log.warning(
            "valkey serving at %s (Ctrl-C to stop); password in %s, full URL in %s: "
            "export PYGIRDER_REDIS=$(cat %s)", shown, os.path.abspath(pw_path),
            os.path.abspath(url_path), os.path.abspath(url_path),
        )  # fmt: skip
        try:
            while not ctx.stopping.is_set() and srv.is_running():
                ctx.stopping.wait(0.5)
        finally:
            srv.stop()
            if os.path.exists(url_path):
                os.unlink(url_path)
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    return {"url": shown, "password_file": os.path.abspath(pw_path), "stopped": True}


def _write_private(path: str, text: str) -> None:
    """Write a file only its owner can read (it holds a password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _print_gc(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    dry_run = report["dry_run"]
    title = "(dry run) " if dry_run else ""
    table = Table(title=f"pygirder gc {title}older than {report['older_than']}")
    table.add_column("kind")
    table.add_column("would drop" if dry_run else "dropped", justify="right")
    for kind, count in report["dropped"].items():
        table.add_row(kind, f"{count:,}")
    table.add_row("[dim]kept (recent)[/]", f"[dim]{report['kept']:,}[/]")
    Console().print(table)


@service(app, render=_print_gc)
def gc(
    older_than: Annotated[
        str, typer.Option(help="Drop what nobody touched for this long: 90s, 30m, 2h, 7d.")
    ],
    redis: RedisOpt = DEFAULT_URL,
    namespace: NamespaceOpt = "default",
    dry_run: Annotated[bool, typer.Option(help="Only count what would be dropped.")] = False,
) -> dict:
    """Drop old results, call graph records and abandoned requests from a grid.

    Prints what was dropped per kind. With --json: the service envelope,
    with {"dropped", "kept", "dry_run", "older_than"} as its result.
    """
    import redis as redis_lib

    from ..errors import ConfigError, GridConnectionError
    from ..grid.connection import redact
    from ..grid.maintenance import collect_garbage, parse_age

    try:
        age = parse_age(older_than)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--older-than") from None
    client = redis_lib.Redis.from_url(redis)
    try:
        report = collect_garbage(client, namespace, age, dry_run=dry_run)
    except redis_lib.ConnectionError as exc:
        raise GridConnectionError(
            f"cannot reach the grid's server at {redact(redis)}: {exc} (start it with "
            "`pygirder server`, or give its URL with --redis or PYGIRDER_REDIS)"
        ) from None
    finally:
        client.close()
    return {
        "dropped": dict(report.dropped),
        "kept": report.kept,
        "dry_run": dry_run,
        "older_than": older_than,
    }


@service(app, render=print_json)
def submit(
    ctx: ServiceContext,
    target: TargetArg,
    args: ArgsOpt = "[]",
    kwargs: KwargsOpt = "{}",
    redis: Annotated[
        str | None,
        typer.Option("--redis", envvar="PYGIRDER_REDIS", help="Grid URL (default: private grid)."),
    ] = None,
    namespace: NamespaceOpt = "default",
    workers: Annotated[
        int | None, typer.Option(help="Local workers to start (default: per core without --redis).")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait.")] = None,
) -> object:
    """Run one call from the shell and print its result as JSON.

    MODULE is imported from the current directory.
    Exit codes: 0 the result was printed, 1 the call failed (the remote
    error on stderr), 2 a bad command line.
    With --json: one envelope {"result", "error", "time_s", "id", "log"}.
    """
    import pygirder

    from .oneshot import load_grid_function, parse_call_arguments, run_one_call

    func = load_grid_function(target, os.getcwd())
    pos, kw = parse_call_arguments(args, kwargs)
    with pygirder.connect(redis, namespace=namespace, workers=workers) as grid:
        return run_one_call(ctx, grid, func(*pos, **kw), timeout)  # type: ignore[operator]


def _print_demo(report: dict) -> None:
    from ..demo import print_demo

    print_demo(report)


@service(app, render=_print_demo)
def demo(
    ctx: ServiceContext,
    depth: Annotated[int, typer.Option(help="Depth of the fan-out tree (2 or more).")] = 6,
    fanout: Annotated[int, typer.Option(help="Children per node of the tree (1 or more).")] = 4,
    leaf_ms: Annotated[float, typer.Option(help="CPU work per leaf, in milliseconds.")] = 0.2,
    steps: Annotated[
        int, typer.Option(help="Steps of the shared-sub-call lattice (1 or more).")
    ] = 60,
    workers: Annotated[
        int | None, typer.Option(help="Local workers (default: one per core).")
    ] = None,
) -> dict:
    """The main job on a private grid: a re-entrant tree and a lattice of shared sub-calls.

    Prints a table of calls made, executed and reused per workload; exits 1 if
    a workload's check fails. With --json: the service envelope, with
    {"ok", "workers", "total_s", "workloads"} as its result.
    """
    from ..demo import measure_demo

    for name, value, least in (
        ("--depth", depth, 2),
        ("--fanout", fanout, 1),
        ("--steps", steps, 1),
    ):
        if value < least:
            raise typer.BadParameter(f"{value} is too small: give {least} or more", param_hint=name)
    report = measure_demo(depth=depth, fanout=fanout, leaf_ms=leaf_ms, steps=steps,
                          workers=workers, quiet=ctx.json)  # fmt: skip
    if not report["ok"]:
        if not ctx.json:
            _print_demo(report)
        failed = ", ".join(w["name"] for w in report["workloads"] if not w["check"])
        raise PygirderError(f"the demo's check failed for: {failed} (a bug: please report it)")
    return report


def _mount() -> None:
    """Commands that live in their own modules (each imports its heavy parts lazily)."""
    from .dashboard import dashboard_command
    from .logs import logs_command
    from .status import inspect_command, status_command

    app.command("status")(status_command)
    app.command("inspect")(inspect_command)
    app.command("logs")(logs_command)
    app.command("dashboard")(dashboard_command)
    from ..cloud.cli import app as cloud_app

    app.add_typer(cloud_app, name="cloud", help="AWS: account setup, image, artifacts, fleet.")


_mount()


def main() -> None:
    from ..errors import PygirderError

    try:
        app()
    except PygirderError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
