"""The dashboard's web application: JSON endpoints, a server-sent event stream, the page.

One :class:`Monitor` samples the grid once per interval, whoever is watching, and
keeps a short history of throughput, so every viewer sees the same figures and a
page opened late still draws the last few minutes.  The figures come from
:mod:`pygirder.observe.status` (the same as ``pygirder status``).

Endpoints (all behind the token when there is one)::

    GET /                    the page (static/index.html)
    GET /static/...          its script and style sheet
    GET /api/status          the latest snapshot: status, history, recent failures
    GET /api/events          server-sent events: "snapshot" once, then "status" per tick
                             (?limit=N ends the stream after N events, for scripts)
    GET /api/calls/{id}      one call (id or prefix): pygirder.observe.status.call_info
    GET /api/fleet           the fleet's instances by role, or {"configured": false}

Security: without a token the app answers only requests whose Host header is a
loopback name (a DNS-rebinding page cannot read it); with a token every request must
carry it, as ``Authorization: Bearer``, ``X-Pygirder-Token``, ``?token=`` or the
cookie set when the page is opened with ``?token=``.  Starlette and uvicorn are
imported inside the functions: they are the ``dashboard`` extra, not core deps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote

import redis

from ..observe.status import (
    MIN_PREFIX,
    CallLookupError,
    FailureScanner,
    call_info,
    collect_status,
    count_keys,
    throughput,
)

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = [
    "FleetSource",
    "Monitor",
    "ServerThread",
    "bind_socket",
    "create_app",
    "default_fleet_source",
    "serve_in_thread",
]

log = logging.getLogger("pygirder.dashboard")

STATIC_DIR = Path(__file__).parent / "static"
TOKEN_COOKIE = "pygirder_dashboard_token"
TOKEN_HEADER = "x-pygirder-token"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# Counting the namespace's keys walks the key space.  A walk is repeated once it is
# 20 times as old as it took (so walking costs the server at most ~5% of the time),
# and at least every KEY_COUNT_REFRESH_S; a small grid is walked every tick.
KEY_COUNT_REFRESH_S = 10.0
# A fleet listing is slow (AWS API calls) and changes slowly: ask this often at most.
FLEET_REFRESH_S = 30.0

# A fleet source returns the fleet's instances, each a dict with at least "id" and
# "role" (and, when known: "state", "type", "zone", "private_ip", "public_ip",
# "launched", "expires"), or None when no fleet is configured.
FleetSource = Callable[[], "list[dict[str, Any]] | None"]


def default_fleet_source() -> FleetSource | None:
    """:func:`pygirder.cloud.fleet.dashboard_instances`: the live instances of
    ./pygirder.toml's setup, or None without a ``[cloud]`` configuration or boto3.

    Imported when asked for, not with this module: the fleet package loads the whole
    AWS tooling (config, adaptor, launch, access), which a dashboard of a local grid
    never needs, and cloud code that fails to import must not take the dashboard down.
    """
    try:
        from ..cloud.fleet import dashboard_instances
    except Exception as exc:  # broken cloud code: show "no fleet configured", say why
        log.warning("pygirder.cloud.fleet failed to import: %s", exc)
        return None
    return dashboard_instances


class Monitor:
    """Samples one grid for every viewer: the latest snapshot plus a throughput history.

    ``sample()`` is blocking (it talks to the server) and meant for a worker thread;
    the app's background task calls it once per ``interval`` and wakes the event
    streams.  A server that stops answering is reported in the snapshot's ``error``
    instead of breaking the page.
    """

    def __init__(
        self,
        redis_url: str,
        namespace: str,
        *,
        interval: float = 1.0,
        history: int = 300,
        fleet: FleetSource | None = None,
    ) -> None:
        self.namespace = namespace
        self.interval = interval
        self.client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=10)
        self.failures = FailureScanner(self.client, namespace)
        self.history: deque[dict[str, Any]] = deque(maxlen=history)
        self.fleet = fleet
        self.snapshot: dict[str, Any] | None = None
        self.version = 0  # bumped on every sample; streams wait for it to change
        self._last_status: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._fleet_cache: tuple[float, dict[str, Any]] | None = None
        self._key_counts: dict[str, Any] | None = None
        self._walk_s = 0.0  # how long the last walk over the keys took

    def sample(self) -> dict[str, Any]:
        """Read the grid now, append to the history, and return the new snapshot."""
        with self._lock:
            try:
                counts = self._key_counts
                due = min(KEY_COUNT_REFRESH_S, 20 * self._walk_s)
                if counts is None or time.time() - counts["time"] >= due:
                    began = time.perf_counter()
                    counts = self._key_counts = count_keys(self.client, self.namespace)
                    self._walk_s = time.perf_counter() - began
                status = collect_status(self.client, self.namespace, key_counts=counts)
                failures = self.failures.step()
            except redis.RedisError as exc:
                self.snapshot = {
                    **(self.snapshot or {"status": None, "failures": [], "point": None}),
                    "error": f"cannot read the grid's server: {exc}",
                    "time": time.time(),
                }
                self.version += 1
                return self.snapshot
            if self._last_status is not None:
                status["calls_per_s"] = throughput(self._last_status, status)
            self._last_status = status
            point = {
                "t": status["time"],
                "rate": status["calls_per_s"],
                "executed": status["stats"]["executed"],
                "queued": status["totals"]["queued"],
                "busy": status["totals"]["busy"],
                "alive": status["totals"]["alive"],
            }
            self.history.append(point)
            self.snapshot = {
                "status": status,
                "failures": failures,
                "point": point,
                "error": None,
                "time": status["time"],
                "interval": self.interval,
            }
            self.version += 1
            return self.snapshot

    def latest(self) -> dict[str, Any]:
        """The latest snapshot with the whole history (sampling first if there is none)."""
        snapshot = self.snapshot or self.sample()
        return {**snapshot, "history": list(self.history)}

    def fleet_view(self) -> dict[str, Any]:
        """The fleet's instances grouped by role (cached for FLEET_REFRESH_S)."""
        if self.fleet is None:
            return {"configured": False, "instances": [], "roles": {}, "error": None}
        now = time.monotonic()
        if self._fleet_cache is not None and now - self._fleet_cache[0] < FLEET_REFRESH_S:
            return self._fleet_cache[1]
        try:
            instances = self.fleet()
            view: dict[str, Any] = {"configured": instances is not None, "error": None}
            instances = [dict(i) for i in instances or []]
        except Exception as exc:  # AWS down, no credentials...: say so on the page
            view = {"configured": True, "error": f"{type(exc).__name__}: {exc}"}
            instances = []
        roles: dict[str, int] = {}
        for inst in instances:
            role = str(inst.get("role") or "unknown")
            roles[role] = roles.get(role, 0) + 1
        view.update(instances=instances, roles=roles, checked=time.time())
        self._fleet_cache = (now, view)
        return view

    def close(self) -> None:
        self.client.close()


# -- security ----------------------------------------------------------------------------
def _host_name(host_header: str) -> str:
    """The host of a Host header, without the port (IPv6 literals keep no brackets)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _Gate:
    """ASGI middleware: the token (or, without one, a loopback Host) on every request,
    and headers that keep the page from leaking or being framed."""

    def __init__(self, app: Any, token: str | None, allowed_hosts: frozenset[str]) -> None:
        self.app = app
        self.token = token
        self.allowed_hosts = allowed_hosts

    def _presented(self, scope: dict[str, Any]) -> tuple[str | None, bool]:
        """The token the request carries, and whether it came in the query string."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        if TOKEN_HEADER in headers:
            return headers[TOKEN_HEADER].strip(), False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("token"):
            return query["token"][0], True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:
            return None, False
        morsel = cookie.get(TOKEN_COOKIE)
        return (unquote(morsel.value) if morsel else None), False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        set_cookie = False
        if self.token is None:
            host = _host_name(dict(scope["headers"]).get(b"host", b"").decode("latin-1"))
            if host not in self.allowed_hosts:
                await _plain(
                    send, 403, f"host {host!r} is not allowed; open the dashboard through "
                    "127.0.0.1 or localhost, or start it with --token",
                )  # fmt: skip
                return
        else:
            presented, in_query = self._presented(scope)
            if presented is None or not hmac.compare_digest(
                presented.encode(), self.token.encode()
            ):
                await _plain(
                    send, 401, "this dashboard needs its token: open the URL that "
                    "`pygirder dashboard` printed (…/?token=…), or send "
                    "'Authorization: Bearer <token>'",
                )  # fmt: skip
                return
            set_cookie = in_query

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", _CSP),
                    (b"cache-control", b"no-store"),
                ]
                if set_cookie:
                    headers.append(
                        (
                            b"set-cookie",
                            f"{TOKEN_COOKIE}={quote(self.token or '', safe='')}; Path=/; HttpOnly; "
                            "SameSite=Strict".encode(),
                        )
                    )
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


async def _plain(send: Any, status: int, text: str) -> None:
    body = (text + "\n").encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# -- the app -------------------------------------------------------------------------
def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def create_app(
    redis_url: str,
    namespace: str,
    token: str | None = None,
    *,
    interval: float = 1.0,
    fleet: FleetSource | bool | None = True,
    allowed_hosts: frozenset[str] | set[str] | None = None,
) -> Starlette:
    """The dashboard of the grid at ``redis_url`` / ``namespace`` as a Starlette app.

    ``token``: required on every request when given (see the module docstring);
    without one, only loopback Host headers are answered (``allowed_hosts`` widens
    that, e.g. for a reverse proxy).  ``interval``: seconds between samples.
    ``fleet``: a :data:`FleetSource`, ``None`` for no fleet section, or ``True`` to
    use the cloud code's (:func:`default_fleet_source`).
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    if token is not None and not token.strip():
        raise ValueError("token is empty: give a real token, or None for loopback-only access")
    source = default_fleet_source() if fleet is True else (fleet or None)
    monitor = Monitor(redis_url, namespace, interval=interval, fleet=source)  # type: ignore[arg-type]
    # Created in the lifespan, on the loop that serves the app; without a lifespan (a
    # bare ASGI host) every event stream samples for itself.
    shared: dict[str, asyncio.Condition | None] = {"changed": None}

    async def sampler(changed: asyncio.Condition) -> None:
        while True:
            try:
                await asyncio.to_thread(monitor.sample)
            except Exception:  # never let one bad sample stop the dashboard
                log.exception("sampling the grid failed")
            async with changed:
                changed.notify_all()
            await asyncio.sleep(interval)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        shared["changed"] = changed = asyncio.Condition()
        task = asyncio.create_task(sampler(changed), name="pygirder-dashboard-sampler")
        try:
            yield
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            shared["changed"] = None
            monitor.close()

    async def next_sample(seen: int) -> bool:
        """Wait for a sample newer than ``seen``; False after a quiet spell (keep-alive)."""
        changed = shared["changed"]
        if changed is None:
            await asyncio.sleep(interval)
            await asyncio.to_thread(monitor.sample)
            return True
        async with changed:
            try:
                await asyncio.wait_for(
                    changed.wait_for(lambda: monitor.version != seen), timeout=15
                )
            except TimeoutError:
                return False
        return True

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    async def api_status(request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(monitor.latest))

    async def api_call(request: Request) -> Response:
        call_id = request.path_params["call_id"]
        if len(call_id) < MIN_PREFIX:
            return JSONResponse(
                {"error": f"give at least {MIN_PREFIX} characters of the call id"}, 400
            )
        try:
            info = await asyncio.to_thread(call_info, monitor.client, namespace, call_id)
        except CallLookupError as exc:
            code = 409 if exc.matches else 404
            return JSONResponse({"error": str(exc), "matches": list(exc.matches)}, code)
        return JSONResponse(info)

    async def api_fleet(request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(monitor.fleet_view))

    async def api_events(request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "0"))
        except ValueError:
            limit = 0

        async def stream() -> Any:
            sent = 0
            snapshot = await asyncio.to_thread(monitor.latest)
            yield f"retry: {int(max(1.0, interval) * 2000)}\n\n".encode()
            yield _sse("snapshot", snapshot)
            sent += 1
            seen = monitor.version
            while not limit or sent < limit:
                if not await next_sample(seen):
                    yield b": keep-alive\n\n"
                    continue
                seen = monitor.version
                if monitor.snapshot is not None:
                    yield _sse("status", monitor.snapshot)
                    sent += 1

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"x-accel-buffering": "no"},
        )

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/status", api_status),
            Route("/api/events", api_events),
            Route("/api/calls/{call_id}", api_call),
            Route("/api/fleet", api_fleet),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        lifespan=lifespan,
    )
    app.state.monitor = monitor
    hosts = frozenset(allowed_hosts) if allowed_hosts is not None else LOOPBACK_HOSTS
    app.add_middleware(_Gate, token=token, allowed_hosts=hosts)  # type: ignore[arg-type]
    return app


# -- serving -----------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name to bind) is reachable from this machine only."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host``:``port`` (0: a free port), bound before
    uvicorn starts so the real port is known and a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """A uvicorn server running in a daemon thread; ``stop()`` shuts it down."""

    def __init__(self, server: Any, thread: threading.Thread, url: str) -> None:
        self.server = server
        self.thread = thread
        self.url = url

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> ServerThread:
    """Serve ``app`` with uvicorn in a background thread (port 0: any free port) and
    return once it accepts connections; for tests and notebooks."""
    import uvicorn

    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=1, lifespan="on", access_log=False
    )
    server = uvicorn.Server(config)

    def run() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()

    thread = threading.Thread(target=run, name="pygirder-dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the dashboard server did not start")
        time.sleep(0.01)
    shown = f"[{host}]" if ":" in host else host
    return ServerThread(server, thread, f"http://{shown}:{bound_port}")
