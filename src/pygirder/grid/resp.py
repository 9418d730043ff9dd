"""A lean connection for the commands a process repeats most: its inbox read, and a
client's scripts.

Every isolated call wakes two inboxes (the worker's, with the hand-off; the caller's,
with the result), and redis-py's asyncio client spends about 150 us of CPU on each
command (its pool, retry wrapper, timeout contexts and ``StreamReader``) where the
server spends 10.  This connection is an ``asyncio.Protocol`` that writes the packed
command to the transport and parses replies with hiredis as they arrive: about a
quarter of redis-py's cost per command.

Commands are answered in the order they were sent, so a read can be sent while the one
before it still waits on the server: the inbox loop keeps a second read queued behind
the first, and the next message is read at once while the loop handles this one.  It
does not retry: a lost connection, a reply that does not come in time, or a refused
login raise redis-py's own exception classes, so the caller's handling (the inbox loop
logs, backs off, rechecks what it waits for, and reads again) is the same for both
clients.  The next command after a failure connects afresh.

A client's scripts (every call's submit, its cancels) go through one too
(:class:`LeanCommands`): those do ride out a lost connection, with redis-py's own
policy of ``connect_redis`` (retry only lost connections, with backoff, for the
reconnect window).

Plain TCP and Unix-socket URLs use it; a ``rediss://`` URL keeps redis-py's client,
whose TLS options (certificates, ``ssl_cert_reqs`` and the rest) are the ones a user
configures.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import Any, Protocol

import hiredis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import parse_url

from .. import settings
from .connection import connect_redis, reconnect_policy


class Reader(Protocol):
    """What the inbox loop needs of a client: commands sent now whose replies it awaits
    later (several may be in flight), and closing."""

    async def send(self, *args: Any, timeout: float) -> asyncio.Future[Any]: ...

    async def aclose(self) -> None: ...


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in the server's protocol (arguments: bytes, str, int or float), packed
    by hiredis as the grid's other clients' commands are (``connection._pack_in_c``)."""
    try:
        return hiredis.pack_command(args)  # type: ignore[no-any-return]
    except TypeError:  # a buffer it does not take, or an argument nobody should send
        pass
    parts: list[Any] = []
    for arg in args:
        if isinstance(arg, bytearray | memoryview):
            arg = bytes(arg)
        elif not isinstance(arg, bytes | str | int | float) or isinstance(arg, bool):
            raise redis_errors.DataError(
                f"a command argument must be bytes, str, int or float, not {type(arg).__name__}"
            )
        parts.append(arg)
    return hiredis.pack_command(tuple(parts))  # type: ignore[no-any-return]


def _error(message: str) -> redis_errors.ResponseError:
    """An error reply as redis-py's parser would class it, for the two the grid acts on:
    a script the server does not know (load it and run it again) and a full server."""
    if message.startswith("NOSCRIPT"):
        return redis_errors.NoScriptError(message)
    if message.startswith("OOM"):
        return redis_errors.OutOfMemoryError(message)
    return redis_errors.ResponseError(message)


class _Replies(asyncio.Protocol):
    """Parses replies and hands each to the oldest command waiting for one."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=_error)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            # as redis-py's clients do: a peer that vanished is noticed on an idle link
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
            while (reply := self.reader.gets()) is not False:
                if not self.waiting:
                    raise redis_errors.ConnectionError("a reply nobody asked for")
                fut = self.waiting.popleft()
                if fut.done():
                    continue
                if isinstance(reply, redis_errors.ResponseError):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)
        except Exception as exc:  # a protocol error: nothing after it can be trusted
            self.lose(exc if isinstance(exc, redis_errors.RedisError)
                      else redis_errors.ConnectionError(f"unreadable reply: {exc}"))  # fmt: skip

    def connection_lost(self, exc: Exception | None) -> None:
        self.lose(redis_errors.ConnectionError(
            f"connection to the server lost: {exc}" if exc else "the server closed the connection"
        ))  # fmt: skip

    def lose(self, exc: Exception) -> None:
        """Fail every command still waiting and close: the connection is spoilt."""
        if self.lost is None:
            self.lost = exc
        waiting, self.waiting = self.waiting, deque()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(self.lost)
                fut.exception()  # retrieved: a read nobody awaits any more is no error
        if self.transport is not None:
            self.transport.abort()


class LeanConnection:
    """One server connection of its own, opened at the first command (see the module
    docstring).  ``block``: seconds a blocking command may wait on the server, on top of
    the socket time-out."""

    def __init__(self, url: str, *, block: float = 0.0) -> None:
        self.options = parse_url(url)
        self.timeout = settings.socket_timeout() + block
        self._protocol: _Replies | None = None
        self._connecting = asyncio.Lock()

    async def _connected(self) -> _Replies:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        async with self._connecting:
            protocol = self._protocol
            if protocol is None or protocol.lost is not None:
                protocol = self._protocol = await self._connect()
            return protocol

    async def _connect(self) -> _Replies:
        loop = asyncio.get_running_loop()
        opts = self.options
        try:
            async with asyncio.timeout(min(self.timeout, 10.0)):
                if opts.get("path"):
                    _, protocol = await loop.create_unix_connection(_Replies, opts["path"])
                else:
                    _, protocol = await loop.create_connection(
                        _Replies, opts.get("host", "localhost"), int(opts.get("port", 6379))
                    )
        except (OSError, TimeoutError) as exc:
            raise redis_errors.ConnectionError(f"cannot connect to the server: {exc}") from None
        try:
            password, username = opts.get("password"), opts.get("username")
            if password is not None:
                auth = ("AUTH", username, password) if username else ("AUTH", password)
                try:
                    await self._write(protocol, auth, self.timeout)
                except redis_errors.ResponseError as exc:
                    raise redis_errors.AuthenticationError(str(exc)) from None
            if int(opts.get("db", 0) or 0):
                await self._write(protocol, ("SELECT", int(opts["db"])), self.timeout)
        except BaseException as exc:
            protocol.lose(exc if isinstance(exc, Exception) else redis_errors.ConnectionError())
            raise
        return protocol

    def _write(
        self, protocol: _Replies, args: tuple[Any, ...], timeout: float
    ) -> asyncio.Future[Any]:
        if protocol.lost is not None or protocol.transport is None:
            raise protocol.lost or redis_errors.ConnectionError("not connected")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        protocol.waiting.append(fut)
        protocol.transport.write(pack(args))
        name = args[0]

        def expired() -> None:
            if not fut.done():
                fut.set_exception(redis_errors.TimeoutError(
                    f"no reply from the server within {timeout:.0f}s to {name!r}"
                ))  # fmt: skip
                fut.exception()
                protocol.lose(
                    redis_errors.ConnectionError(
                        f"closed after a reply to {name!r} did not come in time"
                    )
                )  # fmt: skip: the reply may still come, out of step

        def settled(_: asyncio.Future[Any]) -> None:
            timer.cancel()
            if fut.cancelled() and protocol.lost is None:
                # given up before its reply: close, so the server drops a blocking read
                # instead of popping messages for a reply nobody will read
                protocol.lose(redis_errors.ConnectionError(f"{name!r} was cancelled"))

        timer = loop.call_later(timeout, expired)
        fut.add_done_callback(settled)
        return fut

    async def send(self, *args: Any, timeout: float | None = None) -> asyncio.Future[Any]:
        """Write one command now (connecting first if need be); the future gets its
        reply or its error.  Commands sent one after the other are answered in order."""
        protocol = await self._connected()
        return self._write(protocol, args, self.timeout if timeout is None else timeout)

    async def execute_command(self, *args: Any) -> Any:
        """Send one command and return its reply (raw bytes, ints, lists, None)."""
        return await (await self.send(*args))

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.lose(redis_errors.ConnectionError("the connection was closed"))
            await asyncio.sleep(0)  # let the transport finish closing


class LeanCommands(LeanConnection):
    """A lean connection whose commands ride out a lost connection as ``connect_redis``'s
    clients do: a command that fails for a lost connection (before or after it was
    sent) is sent again on a new one, with ``connection.reconnect_policy``'s backoff,
    for the reconnect window; a reply that does not come in time and every error reply
    are the caller's.  A script may so run twice, as it may with redis-py's retries:
    the grid's scripts are written to be run again."""

    def __init__(self, url: str, *, reconnect_timeout: float | None = None) -> None:
        super().__init__(url)
        if reconnect_timeout is None:
            reconnect_timeout = settings.liveness().reconnect_timeout
        self.backoff, self.retries = reconnect_policy(reconnect_timeout)

    async def execute_command(self, *args: Any) -> Any:
        failures = 0
        while True:
            try:
                return await (await self.send(*args))
            except (redis_errors.TimeoutError, redis_errors.AuthenticationError):
                raise
            except redis_errors.ConnectionError:
                failures += 1
                if failures > self.retries:
                    raise
                await asyncio.sleep(self.backoff.compute(failures))

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        """As redis-py's ``evalsha``, for ``store.scripts.Script.run``."""
        return await self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    async def script_load(self, source: str) -> Any:
        return await self.execute_command("SCRIPT", "LOAD", source)


class _RedisReader:
    """redis-py's client behind the same interface: one command in flight at a time
    (its pool has one connection), each run by a task of its own."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def send(self, *args: Any, timeout: float) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self.client.execute_command(*args))

    async def aclose(self) -> None:
        await self.client.aclose()


async def connect_reader(url: str, *, block: float) -> Reader:
    """A client for a process's inbox loop: lean where the URL allows (see the module
    docstring).  The caller has reached the server already (``connect_redis`` says
    what to fix when it cannot), so this opens nothing until the first read."""
    if not is_lean(url):
        return _RedisReader(await connect_redis(url, max_connections=1, block=block))
    return LeanConnection(url, block=block)


def is_lean(url: str) -> bool:
    """Whether ``connect_reader`` gives this URL a lean connection (not for TLS)."""
    return url.startswith(("redis://", "unix://"))
