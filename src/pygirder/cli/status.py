"""``pygirder status`` and ``pygirder inspect``: the grid and one call, in the terminal.

Mount them on the main CLI as plain commands::

    from pygirder.cli.status import inspect_command, status_command
    app.command("status")(status_command)
    app.command("inspect")(inspect_command)

``app`` below holds the same two commands as a standalone Typer app (``python -m
pygirder.cli.status``), for tests and debugging without the main CLI.  The figures
come from :mod:`pygirder.observe.status`, which the dashboard shares.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Annotated, Any

import redis
import typer
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..grid.connection import unreachable
from ..observe.status import (
    MIN_PREFIX,
    CallLookupError,
    FailureScanner,
    call_info,
    collect_status,
    sample_executed,
    throughput,
)

__all__ = ["app", "inspect_command", "render_call", "render_status", "status_command"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# Characters of a request id shown in tables: enough to tell calls apart and to pass
# back to `pygirder inspect` (which takes a prefix of at least MIN_PREFIX).
ID_CHARS = 12

RedisOpt = Annotated[
    str,
    typer.Option("--redis", metavar="URL", envvar="PYGIRDER_REDIS", help="The grid's server."),
]
NamespaceOpt = Annotated[
    str,
    typer.Option("--namespace", envvar="PYGIRDER_NAMESPACE", help="The grid's namespace."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]

STATE_STYLES = {
    "idle": "green",
    "busy": "yellow",
    "dead": "bold red",
    "done": "green",
    "failed": "bold red",
    "queued": "cyan",
    "local": "yellow",
    "running": "yellow",
    "taken": "yellow",
}


# -- formatting ------------------------------------------------------------------------
def _dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _secs(value: float | None) -> str:
    """A duration as people read it: 850ms, 12.3s, 4m05s, 3h02m, 2d04h."""
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 60:
        return f"{value:.1f}s"
    minutes, s = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{m:02d}m"
    days, h = divmod(hours, 24)
    return f"{days}d{h:02d}h"


def _when(epoch: float | None, *, short: bool = False) -> str:
    """Local time of an epoch; ``short`` drops the date when it is today."""
    if epoch is None:
        return "-"
    when = datetime.fromtimestamp(epoch)
    if short and when.date() == datetime.now().date():
        return when.strftime("%H:%M:%S")
    return when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _state(state: str | None) -> Text:
    return Text(_dash(state), style=STATE_STYLES.get(state or "", ""))


def _short(request_id: str | None) -> str:
    return request_id[:ID_CHARS] if request_id else "-"


def _count(value: int, complete: bool) -> str:
    return f"{value:,}" if complete else f">= {value:,}"


# -- status ---------------------------------------------------------------------------
def render_status(
    status: dict[str, Any], failures: list[dict[str, Any]] | None = None
) -> RenderableType:
    """The tables of ``pygirder status`` for one :func:`collect_status` snapshot."""
    stats, rates, totals, keys = status["stats"], status["rates"], status["totals"], status["keys"]
    rate = status.get("calls_per_s")
    summary = Table.grid(padding=(0, 3))
    for _ in range(4):
        summary.add_column(style="bold", no_wrap=True)
        summary.add_column(no_wrap=True)
    summary.add_row(
        "workers", f"{totals['alive']} alive"
        + (f", [red]{totals['dead']} dead[/]" if totals["dead"] else ""),
        "calls/s", "-" if rate is None else f"{rate:,.1f}",
        "cache hits", _pct(rates["cache_hit"]),
        "results", _count(keys["results"], keys["complete"]),
    )  # fmt: skip
    summary.add_row(
        "busy/idle", f"{totals['busy']} / {totals['idle']}",
        "executed", f"{stats['executed']:,}",
        "sharing", _pct(rates["sharing"]),
        "pending", _count(keys["pending"], keys["complete"]),
    )  # fmt: skip
    summary.add_row(
        "queued", f"{totals['queued']:,}",
        "failed", f"[red]{stats['failed']:,}[/]" if stats["failed"] else "0",
        "moved", f"{stats['moved_to_pool']:,}",
        "call records", _count(keys["calls"], keys["complete"]),
    )  # fmt: skip
    summary.add_row(
        "submitted", f"{stats['submitted']:,}",
        "cached", f"{stats['cached']:,}",
        "shared", f"{stats['shared']:,}",
        "requeued", f"{stats['requeued']:,}",
    )  # fmt: skip
    stamp = datetime.fromtimestamp(status["time"]).strftime("%H:%M:%S")
    parts: list[RenderableType] = [
        Panel(
            summary,
            title=f"grid [bold]{escape(status['namespace'])}[/] at {stamp}",
            title_align="left",
            expand=False,
        )
    ]
    if totals.get("stale"):
        parts.append(Text(
            f"{totals['stale']:,} of the queued are cancelled calls, dropped unrun when taken"
        ))  # fmt: skip

    pools = Table(title="Pools", title_justify="left", expand=False)
    for name, justify in [
        ("pool", "left"), ("workers", "right"), ("busy", "right"), ("idle", "right"),
        ("dead", "right"), ("queue depth", "right"), ("load", "left"),
    ]:  # fmt: skip
        pools.add_column(name, justify=justify)  # type: ignore[arg-type]
    for p in status["pools"]:
        load = p["busy"] / p["alive"] if p["alive"] else 0.0
        bar = "#" * round(10 * load) + "." * (10 - round(10 * load))
        pools.add_row(
            escape(p["name"]), str(p["alive"]), str(p["busy"]), str(p["idle"]),
            Text(str(p["dead"]), style="red" if p["dead"] else ""),
            Text(f"{p['queued']:,}", style="yellow" if p["queued"] and not p["idle"] else ""),
            f"{bar} {100 * load:.0f}%",
        )  # fmt: skip
    if not status["pools"]:
        pools.add_row("[dim]no pools: no worker has registered in this namespace[/]")
    parts.append(pools)

    workers = Table(title="Workers", title_justify="left")
    for name, justify in [
        ("worker", "left"), ("host", "left"), ("pid", "right"), ("pool", "left"),
        ("state", "left"), ("current request", "left"), ("calls done", "right"),
        ("held", "right"), ("uptime", "right"),
    ]:  # fmt: skip
        workers.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for w in status["workers"]:
        current = "-"
        if w["current"]:
            fn = (w["current_fn"] or "").rpartition(":")[2]
            current = f"{escape(fn)} {w['current'][:8]}".strip()
        workers.add_row(
            escape(w["id"]), escape(_dash(w["host"])), _dash(w["pid"]), escape(w["pool"]),
            _state(w["state"]), current, _dash(w["calls_done"]),
            str(w["in_flight"] + w["owned"]), _secs(w["uptime_s"]),
        )  # fmt: skip
    parts.append(workers)

    if failures:
        table = Table(title="Recent failures", title_justify="left")
        for name in ("call", "function", "worker", "finished", "error"):
            table.add_column(name)
        for f in failures:
            table.add_row(
                _short(f["id"]), escape(_dash(f.get("fn"))), escape(_dash(f.get("worker"))),
                _when(f.get("finished"), short=True), Text(_dash(f.get("summary")), style="red"),
            )  # fmt: skip
        parts.append(table)
    return Group(*parts)


def _snapshot(
    client: redis.Redis,
    namespace: str,
    previous: dict[str, Any] | None,
    scanner: FailureScanner | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    status = collect_status(client, namespace)
    if previous is not None:
        status["calls_per_s"] = throughput(previous, status)
    failures = scanner.scan_all() if scanner is not None else []
    return status, failures


def status_command(
    redis_url: RedisOpt = DEFAULT_REDIS_URL,
    namespace: NamespaceOpt = "default",
    json_: JsonOpt = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Keep refreshing (Ctrl-C to stop).")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="Seconds between refreshes (--watch).")
    ] = 2.0,
    sample: Annotated[
        float,
        typer.Option(
            "--sample", min=0.0, help="Seconds to measure calls/s over (0: do not measure)."
        ),
    ] = 1.0,
    failures: Annotated[
        int, typer.Option("--failures", min=0, help="How many recent failures to list.")
    ] = 5,
) -> None:
    """Show the grid: pools, workers, queues, stored results, cache and sharing rates."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
    scanner = FailureScanner(client, namespace, keep=failures) if failures else None
    console = Console(highlight=False)
    try:
        previous = None
        if sample > 0 and not watch:  # --watch measures between its own refreshes
            previous = sample_executed(client, namespace)
            time.sleep(sample)
        status, failed = _snapshot(client, namespace, previous, scanner)
        if not watch:
            if json_:
                typer.echo(json.dumps({**status, "failures": failed}, indent=2))
            else:
                console.print(render_status(status, failed))
            return
        if json_:  # one JSON document per line and refresh
            while True:
                typer.echo(json.dumps({**status, "failures": failed}))
                time.sleep(interval)
                status, failed = _snapshot(client, namespace, status, scanner)
        from rich.live import Live

        with Live(render_status(status, failed), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                status, failed = _snapshot(client, namespace, status, scanner)
                live.update(render_status(status, failed), refresh=True)
    except KeyboardInterrupt:
        pass
    except redis.ConnectionError as exc:
        typer.echo(unreachable(redis_url, exc), err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()


# -- inspect ----------------------------------------------------------------------------
def render_call(info: dict[str, Any]) -> RenderableType:
    """The view of ``pygirder inspect`` for one :func:`call_info` result."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("id", info["id"])
    head.add_row("function", escape(_dash(info["fn"])))
    head.add_row("arguments", escape(_dash(info["args"])))
    head.add_row("state", _state(info["state"]))
    head.add_row(
        "pool / worker", f"{escape(_dash(info['pool']))} / {escape(_dash(info['worker']))}"
    )
    if info.get("attempts"):
        head.add_row("attempts", str(info["attempts"]))
    head.add_row("submitted", _when(info["submitted"]))
    head.add_row("started", f"{_when(info['started'])}  (queued {_secs(info['queued_s'])})")
    head.add_row("finished", f"{_when(info['finished'])}  (ran {_secs(info['duration_s'])})")
    result = info.get("result") or {}
    error = result.get("error")
    if info["state"] == "failed":
        head.add_row("error", Text(_dash(info["summary"]), style="red"))
    else:
        head.add_row("result", escape(_dash(info["summary"])))
    if info["ancestors"]:
        path = " > ".join(f"{_dash(a['fn'])} {_short(a['id'])}" for a in info["ancestors"])
        if info["ancestors_truncated"]:
            path = "... > " + path
        head.add_row("called from", Text(path))
    else:
        head.add_row("called from", "[dim]a client (top-level call)[/]")
    if not info["record"]:
        head.add_row("", "[dim]its call record has expired: only the result or state is left[/]")
    title = f"call [bold]{escape(_dash(info['fn']))}[/]"
    parts: list[RenderableType] = [Panel(head, title=title, title_align="left")]

    if error and error.get("traceback"):
        parts.append(
            Panel(
                Text(error["traceback"].rstrip(), style="red"),
                title="remote traceback",
                title_align="left",
            )
        )
    kids = info["children"]
    if info["children_total"]:
        shown = (
            f" ({len(kids)} of {info['children_total']} shown)"
            if info["children_total"] > len(kids)
            else f" ({info['children_total']})"
        )
        table = Table(title=f"Children{shown}", title_justify="left")
        for name, justify in [
            ("call", "left"), ("function", "left"), ("arguments", "left"), ("state", "left"),
            ("duration", "right"), ("result", "left"),
        ]:  # fmt: skip
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for kid in kids:
            table.add_row(
                _short(kid["id"]), escape(_dash(kid.get("fn"))), escape(_dash(kid.get("args"))),
                _state(kid.get("state") if not kid.get("missing") else "expired"),
                _secs(kid.get("duration_s")), escape(_dash(kid.get("summary"))),
            )  # fmt: skip
        parts.append(table)
    else:
        parts.append(Text("no children: this call made no grid calls", style="dim"))
    return Group(*parts)


def inspect_command(
    call_id: Annotated[
        str,
        typer.Argument(
            metavar="ID", help=f"A call's request id, or a prefix of at least {MIN_PREFIX}."
        ),
    ],
    redis_url: RedisOpt = DEFAULT_REDIS_URL,
    namespace: NamespaceOpt = "default",
    json_: JsonOpt = False,
) -> None:
    """Show one call: function, arguments, state, worker, times, result, children."""
    if len(call_id.strip()) < MIN_PREFIX:
        raise typer.BadParameter(
            f"give at least {MIN_PREFIX} characters of the call id", param_hint="ID"
        )
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
    try:
        info = call_info(client, namespace, call_id)
    except CallLookupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except redis.ConnectionError as exc:
        typer.echo(unreachable(redis_url, exc), err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()
    if json_:
        typer.echo(json.dumps(info, indent=2))
    else:
        Console(highlight=False).print(render_call(info))


app = typer.Typer(add_completion=False, no_args_is_help=True)
app.command("status")(status_command)
app.command("inspect")(inspect_command)

if __name__ == "__main__":  # pragma: no cover
    app()
