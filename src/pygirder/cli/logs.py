"""``pygirder logs``: show or tail the log records of every process of a grid.

Mount it on the main CLI as one command::

    from pygirder.cli.logs import logs_command
    app.command("logs")(logs_command)

``app`` below is the same command as a standalone Typer app (``python -m
pygirder.cli.logs``), handy for tests and for debugging without the main CLI.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import redis
import typer
from rich.console import Console
from rich.text import Text

from ..grid.connection import unreachable
from ..observe.logs import LogEntry, follow_logs, last_entry_id, newer_id, parse_level, read_logs

__all__ = ["app", "format_entry", "logs_command"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

_LEVEL_STYLES = {
    "DEBUG": "dim",
    "INFO": "green",
    "WARNING": "yellow",
    "ERROR": "red",
    "CRITICAL": "bold white on red",
}
# Request ids are long hashes; this many characters are enough to tell them apart
# on screen and to pass back to --request (which matches a prefix).
REQUEST_ID_CHARS = 12


def format_entry(entry: LogEntry) -> Text:
    """One readable line (plus the exception, indented): time, level, where, request, text."""
    stamp = datetime.fromtimestamp(entry.time).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    where = f"{entry.host}:{entry.pid}"
    if entry.process and entry.process != where:
        where = f"{entry.process}@{where}"
    line = Text()
    line.append(stamp, style="dim")
    line.append(" ")
    line.append(f"{entry.level:<8}", style=_LEVEL_STYLES.get(entry.level, ""))
    line.append(where, style="cyan")
    if entry.request:
        line.append(f" [{entry.request[:REQUEST_ID_CHARS]}]", style="magenta")
    line.append(f" {entry.logger}: " if entry.logger else " ", style="dim")
    line.append(entry.message)
    if entry.exc:
        line.append("\n" + "\n".join("    " + x for x in entry.exc.rstrip().splitlines()))
    return line


def logs_command(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new records as they arrive.")
    ] = False,
    level: Annotated[
        str | None,
        typer.Option("--level", help="Minimum level: DEBUG, INFO, WARNING, ERROR, CRITICAL."),
    ] = None,
    request: Annotated[
        str | None,
        typer.Option("--request", metavar="ID", help="Only records of this request (id prefix)."),
    ] = None,
    redis_url: Annotated[
        str,
        typer.Option("--redis", metavar="URL", envvar="PYGIRDER_REDIS", help="The grid's server."),
    ] = DEFAULT_REDIS_URL,
    namespace: Annotated[
        str,
        typer.Option("--namespace", envvar="PYGIRDER_NAMESPACE", help="The grid's namespace."),
    ] = "default",
    lines: Annotated[
        int, typer.Option("--lines", "-n", min=0, help="How many past records to show first.")
    ] = 20,
) -> None:
    """Show the latest log records of every process of the grid (-f: and follow)."""
    try:
        levelno = parse_level(level) if level is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--level") from None
    console = Console(highlight=False, soft_wrap=True)
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
    try:
        start = last_entry_id(client, namespace)
        past = read_logs(client, namespace, level=levelno, request=request, count=lines)
        for entry in past if lines else ():
            console.print(format_entry(entry))
        if follow:
            since = newer_id(start, past[-1].id) if past else start
            for entry in follow_logs(
                client, namespace, since=since, level=levelno, request=request
            ):
                console.print(format_entry(entry))
    except KeyboardInterrupt:
        pass
    except redis.ConnectionError as exc:
        typer.echo(unreachable(redis_url, exc), err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()


app = typer.Typer(add_completion=False)
app.command("logs")(logs_command)

if __name__ == "__main__":  # pragma: no cover
    app()
