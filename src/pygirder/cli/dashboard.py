"""``pygirder dashboard``: serve the live web page of a grid.

Mount it on the main CLI as one command::

    from pygirder.cli.dashboard import dashboard_command
    app.command("dashboard")(dashboard_command)

It binds to 127.0.0.1 by default.  Bound to any other address it refuses to start
without ``--token``: the page shows call arguments and results, which are the user's
data.  Needs the ``dashboard`` extra (``pip install 'pygirder[dashboard]'``).
"""

from __future__ import annotations

from typing import Annotated

import redis
import typer

from ..grid.connection import unreachable

__all__ = ["app", "dashboard_command"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
TOKEN_HINT = "--token \"$(python -c 'import secrets; print(secrets.token_urlsafe(24))')\""


def dashboard_command(
    redis_url: Annotated[
        str,
        typer.Option("--redis", metavar="URL", envvar="PYGIRDER_REDIS", help="The grid's server."),
    ] = DEFAULT_REDIS_URL,
    namespace: Annotated[
        str,
        typer.Option("--namespace", envvar="PYGIRDER_NAMESPACE", help="The grid's namespace."),
    ] = "default",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8080,
    bind: Annotated[
        str, typer.Option("--bind", help="Address to listen on (non-loopback needs --token).")
    ] = "127.0.0.1",
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="PYGIRDER_DASHBOARD_TOKEN",
            help="Secret every request must carry (required unless bound to loopback).",
        ),
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, help="Seconds between updates.")
    ] = 1.0,
) -> None:
    """Serve a live web dashboard of the grid: workers, pools, throughput, calls."""
    try:
        import uvicorn

        from ..dashboard.app import bind_socket, create_app, is_loopback
    except ImportError as exc:
        typer.echo(
            f"error: the dashboard needs starlette and uvicorn ({exc}); "
            "install them with: pip install 'pygirder[dashboard]'",
            err=True,
        )
        raise typer.Exit(1) from None
    if token is not None and not token.strip():
        raise typer.BadParameter("the token is empty", param_hint="--token")
    if token is None and not is_loopback(bind):
        typer.echo(
            f"error: refusing to serve the dashboard on {bind} without a token: anyone who "
            "can reach that address would see the grid's calls, arguments and results. "
            f"Give one with {TOKEN_HINT} (or set PYGIRDER_DASHBOARD_TOKEN), or bind to "
            "127.0.0.1 and use an SSH tunnel.",
            err=True,
        )
        raise typer.Exit(2)
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        typer.echo(unreachable(redis_url, exc), err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()

    try:
        sock = bind_socket(bind, port)
    except OSError as exc:
        typer.echo(f"error: cannot listen on {bind}:{port}: {exc}", err=True)
        raise typer.Exit(1) from None
    port = sock.getsockname()[1]
    web = create_app(redis_url, namespace, token, interval=interval)
    host = bind
    if host in ("0.0.0.0", "::"):
        import socket

        host = socket.gethostname()
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    typer.echo(f"pygirder dashboard of namespace {namespace!r} at {url}  (Ctrl-C to stop)")
    config = uvicorn.Config(
        web, log_level="warning", access_log=False, timeout_graceful_shutdown=2, lifespan="on"
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: a normal stop
        pass
    finally:
        sock.close()


app = typer.Typer(add_completion=False)
app.command("dashboard")(dashboard_command)

if __name__ == "__main__":  # pragma: no cover
    app()
