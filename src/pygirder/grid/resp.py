"""A lean connection for the one command a process repeats most: its inbox read.

Every isolated call wakes two inboxes (the worker's, with the hand-off; the caller's,
with the result), and redis-py's asyncio client spends about 150 us of CPU on each
command (its pool, retry wrapper, timeout contexts and ``StreamReader``) where the
server spends 10.  This connection is an ``asyncio.Protocol`` that writes the packed
command to the transport and parses replies with hiredis as they arrive: about a
quarter of redis-py's cost per command.

It does one thing at a time (the inbox loop never overlaps its reads) and does not
retry: a lost connection, a reply that does not come within the time-out, or a
refused login raise redis-py's own exception classes, so the caller's handling (the
inbox loop logs, backs off, rechecks what it waits for, and reads again) is the same
for both clients.  The next command after a failure connects afresh.

Plain TCP and Unix-socket URLs use it; a ``rediss://`` URL keeps redis-py's client,
whose TLS options (certificates, ``ssl_cert_reqs`` and the rest) are the ones a user
configures.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import parse_url

from .. import settings
from .connection import connect_redis


class Reader(Protocol):
    """What the inbox loop needs of a client: one command at a time, and closing."""

    async def execute_command(self, *args: Any) -> Any: ...

    async def aclose(self) -> None: ...


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in the server's protocol (arguments: bytes, str, int or float)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes | bytearray | memoryview):
            data = bytes(arg)
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int | float) and not isinstance(arg, bool):
            data = repr(arg).encode()
        else:
            raise redis_errors.DataError(
                f"a command argument must be bytes, str, int or float, not {type(arg).__name__}"
            )
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class _Replies(asyncio.Protocol):
    """Parses replies and hands each to the oldest command waiting for one."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=redis_errors.ResponseError)
        self.waiting: list[asyncio.Future[Any]] = []
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
            while (reply := self.reader.gets()) is not False:
                if not self.waiting:
                    raise redis_errors.ConnectionError("a reply nobody asked for")
                fut = self.waiting.pop(0)
                if not fut.done():
                    fut.set_result(reply)
        except Exception as exc:  # a protocol error: nothing after it can be trusted
            self._lose(exc if isinstance(exc, redis_errors.RedisError)
                       else redis_errors.ConnectionError(f"unreadable reply: {exc}"))  # fmt: skip
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(redis_errors.ConnectionError(
            f"connection to the server lost: {exc}" if exc else "the server closed the connection"
        ))  # fmt: skip

    def _lose(self, exc: Exception) -> None:
        if self.lost is None:
            self.lost = exc
        waiting, self.waiting = self.waiting, []
        for fut in waiting:
            if not fut.done():
                fut.set_exception(self.lost)


class LeanConnection:
    """One server connection of its own, opened at the first command (see the module
    docstring).  ``block``: seconds a blocking command may wait on the server, on top of
    the socket time-out."""

    def __init__(self, url: str, *, block: float = 0.0) -> None:
        self.options = parse_url(url)
        self.timeout = settings.socket_timeout() + block
        self._protocol: _Replies | None = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> _Replies:
        loop = asyncio.get_running_loop()
        opts = self.options
        connect_timeout = min(self.timeout, 10.0)
        try:
            async with asyncio.timeout(connect_timeout):
                if opts.get("path"):
                    _, protocol = await loop.create_unix_connection(_Replies, opts["path"])
                else:
                    _, protocol = await loop.create_connection(
                        _Replies, opts.get("host", "localhost"), int(opts.get("port", 6379))
                    )
        except (OSError, TimeoutError) as exc:
            raise redis_errors.ConnectionError(f"cannot connect to the server: {exc}") from None
        self._protocol = protocol
        try:
            password, username = opts.get("password"), opts.get("username")
            if password is not None:
                auth = ("AUTH", username, password) if username else ("AUTH", password)
                try:
                    await self._send(protocol, auth)
                except redis_errors.ResponseError as exc:
                    raise redis_errors.AuthenticationError(str(exc)) from None
            if int(opts.get("db", 0) or 0):
                await self._send(protocol, ("SELECT", int(opts["db"])))
        except BaseException:
            self._drop()
            raise
        return protocol

    async def _send(self, protocol: _Replies, args: tuple[Any, ...]) -> Any:
        if protocol.lost is not None or protocol.transport is None:
            raise protocol.lost or redis_errors.ConnectionError("not connected")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol.waiting.append(fut)
        protocol.transport.write(pack(args))
        try:
            async with asyncio.timeout(self.timeout):
                reply = await fut
        except TimeoutError:
            self._drop()  # the reply may still come: this connection is out of step
            raise redis_errors.TimeoutError(
                f"no reply from the server within {self.timeout:.0f}s to {args[0]!r}"
            ) from None
        except asyncio.CancelledError:
            self._drop()  # the same, for a command given up by its caller
            raise
        if isinstance(reply, redis_errors.ResponseError):
            raise reply
        return reply

    async def execute_command(self, *args: Any) -> Any:
        """Send one command and return its reply (raw bytes, ints, lists, None)."""
        async with self._lock:
            protocol = self._protocol
            if protocol is None or protocol.lost is not None:
                self._drop()
                protocol = await self._connect()
            try:
                return await self._send(protocol, args)
            except redis_errors.ConnectionError:
                self._drop()
                raise

    def _drop(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            with contextlib.suppress(Exception):
                await asyncio.sleep(0)  # let the transport finish closing


async def connect_reader(url: str, *, block: float) -> Reader:
    """A client for a process's inbox loop: lean where the URL allows (see the module
    docstring).  The caller has reached the server already (``connect_redis`` says
    what to fix when it cannot), so this opens nothing until the first read."""
    if not is_lean(url):
        return await connect_redis(url, max_connections=1, block=block)
    return LeanConnection(url, block=block)


def is_lean(url: str) -> bool:
    """Whether ``connect_reader`` gives this URL a lean connection (not for TLS)."""
    return url.startswith(("redis://", "unix://"))
