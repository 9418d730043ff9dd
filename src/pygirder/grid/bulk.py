"""Values to and from the server at memory speed: pipelined GETs read straight into
buffers, and SETs written straight from the value's buffer.

redis-py reads a reply in 64 KiB pieces through an ``asyncio.StreamReader`` and a
parser that copies every piece again; a 10 MB result took several times as long as
the same GET made by a blocking client.  Here the command connection's transport is
lent, for the length of one batch, to a buffered protocol that parses the reply
headers itself and lets the socket write each value's bytes directly into a buffer
of the value's size: one copy, by the kernel.  A few GETs are in flight at a time, so
the socket never waits for a round trip and the server never holds more than a few
values' replies in its output buffers (one MGET of many large values would).

The values come back as ``bytearray`` objects that nobody else holds: callers treat
them as read-only (the result cache and every waiter may share one).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from .. import settings

log = logging.getLogger("pygirder.grid")
T = TypeVar("T")

# GETs in flight at once: enough that a reply is always on its way, few enough that
# the server's output buffers hold a few values, not a batch's worth.
WINDOW = 4
# Reply headers and small replies are read into a scratch buffer of this size.
SCRATCH = 64 * 1024
# Longest reply line accepted: a bulk header ("$536870912\r\n") or an error message.
MAX_HEADER = 4096


# A value at most this large is read into a buffer the reading thread keeps and reuses
# (when the caller converts values as they complete): memory a process has not touched
# yet costs far more than a copy (each page faulted in and zeroed by the kernel), and a
# new buffer per value, then a new object for its decoded value, touched it twice.
SPARE_MAX = 32 * 1024**2
_spare = threading.local()  # the reading thread's buffer: ``.buffer``, a bytearray


def _take_spare(size: int) -> bytearray:
    """This thread's reused buffer, at least ``size`` bytes, for one value at a time:
    a batch read at the same time on another connection gets a buffer of its own."""
    buffer: bytearray | None = getattr(_spare, "buffer", None)
    _spare.buffer = None
    if buffer is None or len(buffer) < size:
        buffer = bytearray(max(size, SCRATCH))
    return buffer


def _give_back(buffer: bytearray) -> None:
    held: bytearray | None = getattr(_spare, "buffer", None)
    if held is None or len(held) < len(buffer):
        _spare.buffer = buffer


class _Replies(asyncio.BufferedProtocol):
    """The replies of pipelined GETs: bulk strings, nulls or errors, in order."""

    def __init__(
        self,
        keys: Sequence[bytes],
        window: int,
        convert: Callable[[memoryview], Any] | None = None,
    ) -> None:
        self.done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.keys = deque(keys)
        self.window = window
        self.convert = convert  # makes each complete value one to keep (else: the buffer)
        self.spare: bytearray | None = None  # the reused buffer ``target`` is a view of
        self.values: list[Any] = []
        self.errors: list[str] = []
        self.expected = len(keys)
        self.scratch = bytearray(SCRATCH)
        self.head = bytearray()  # received bytes not yet parsed
        self.target: bytearray | memoryview | None = None  # the value being filled
        self.got = 0  # bytes of ``target`` filled
        self.crlf = False  # the CRLF after a value is still to come
        self.progress = 0  # bytes received, for the idle time-out
        self.transport: asyncio.Transport | None = None
        self.original: asyncio.BaseProtocol | None = None  # the protocol lent from

    def start(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._send(min(self.window, len(self.keys)))

    def _send(self, count: int) -> None:
        assert self.transport is not None
        commands = []
        for _ in range(count):
            key = self.keys.popleft()
            commands.append(b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(key), key))
        if commands:
            self.transport.write(b"".join(commands))

    # -- the protocol ------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> Any:
        target = self.target
        if target is not None and not self.head:
            return memoryview(target)[self.got :]
        return self.scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self.done.done():
            return
        self.progress += nbytes
        if self.target is not None and not self.head:
            self.got += nbytes
            if self.got == len(self.target):
                self._finish_value()
        else:
            self.head += memoryview(self.scratch)[:nbytes]
        try:
            self._parse()
        except Exception as exc:
            self._fail(redis_errors.ConnectionError(f"unexpected reply to GET: {exc}"))

    def eof_received(self) -> bool:
        self._fail(redis_errors.ConnectionError("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(redis_errors.ConnectionError(f"connection lost while reading values: {exc}"))
        if self.original is not None:  # the stream's own protocol learns it is closed
            self.original.connection_lost(exc)

    # -- parsing -------------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def _finish_value(self) -> None:
        """A value is complete (its CRLF is still to come): send the next GET."""
        target = self.target
        self.target = None
        assert target is not None
        if self.convert is None:
            self.values.append(target)
        else:
            view = target if isinstance(target, memoryview) else memoryview(target)
            try:
                self.values.append(self.convert(view))
            except Exception as exc:
                self.values.append(None)
                self._fail(exc)
            finally:
                view.release()
                if self.spare is not None:  # the reused buffer is free again
                    _give_back(self.spare)
                    self.spare = None
        self.crlf = True
        if self.keys:
            self._send(1)

    def _next(self) -> None:
        """A null or an error reply is complete: send the next GET, or finish."""
        if self.keys:
            self._send(1)
        self._check_done()

    def _check_done(self) -> None:
        if len(self.values) == self.expected and not self.crlf:
            if self.head:
                raise ValueError(f"{len(self.head)} bytes after the last reply")
            self.done.set_result(self.values)

    def _parse(self) -> None:
        head = self.head
        while head:
            if self.target is not None:  # the start of a value came with its header
                take = min(len(head), len(self.target) - self.got)
                self.target[self.got : self.got + take] = memoryview(head)[:take]
                self.got += take
                del head[:take]
                if self.got == len(self.target):
                    self._finish_value()
                continue
            if self.crlf:
                if len(head) < 2:
                    return
                if head[:2] != b"\r\n":
                    raise ValueError("a value not followed by CRLF")
                del head[:2]
                self.crlf = False
                self._check_done()
                continue
            end = head.find(b"\r\n", 0, MAX_HEADER)
            if end < 0:
                if len(head) >= MAX_HEADER:
                    raise ValueError(f"a reply header longer than {MAX_HEADER} bytes")
                return
            if len(self.values) >= self.expected:
                raise ValueError("more replies than GETs")
            kind, line = head[:1], bytes(head[1:end])
            del head[: end + 2]
            if kind == b"$":
                size = int(line)
                if size < 0:
                    self.values.append(None)
                    self._next()
                else:
                    if self.convert is not None and size <= SPARE_MAX:
                        self.spare = _take_spare(size)
                        self.target = memoryview(self.spare)[:size]
                    else:
                        self.target = bytearray(size)
                    self.got = 0
                    if size == 0:
                        self._finish_value()
            elif kind == b"_":  # RESP3 null
                self.values.append(None)
                self._next()
            elif kind == b"-":
                self.errors.append(line.decode(errors="replace"))
                self.values.append(None)
                self._next()
            else:
                raise ValueError(f"reply type {bytes(kind)!r}")


async def _connection(pool: Any) -> Any:
    try:
        return await pool.get_connection()
    except TypeError:  # redis-py before 5.3 names the command
        return await pool.get_connection("GET")


async def _release(pool: Any, conn: Any) -> None:
    """Give the connection back, and let whoever waits for it have it first.

    A bounded pool wakes a waiter on release but lets the releasing task take the
    connection straight back: a worker storing large results one after the other would
    hold its one command connection for as long as that takes, and its heartbeat,
    waiting for the same connection, would lapse (the worker then looks dead)."""
    await pool.release(conn)
    await asyncio.sleep(0)


def _transport_of(conn: Any) -> asyncio.Transport | None:
    """The transport under a redis-py connection, or None where it has none we can lend."""
    writer = getattr(conn, "_writer", None)
    transport = getattr(writer, "transport", None)
    if transport is None or not hasattr(transport, "set_protocol"):
        return None
    if transport.is_closing():
        return None
    return transport  # type: ignore[no-any-return]


async def get_values(
    client: aioredis.Redis,
    keys: Sequence[str | bytes],
    *,
    window: int = WINDOW,
    convert: Callable[[memoryview], T] | None = None,
) -> list[Any]:
    """The values of ``keys`` (None for a missing key), read at memory speed.

    ``convert``: called with a view of each value as soon as it is complete, and its
    return value taken instead of the value's bytes; the view is of a buffer that is
    reused at once (convert copies what it keeps).  Without it, each value is a
    ``bytearray`` of its own.

    Uses one connection of ``client``'s pool for the whole batch.  A connection this
    cannot use (a redis-py without the transport it expects) gets a plain MGET.
    A lost connection raises redis-py's ConnectionError, an idle read its TimeoutError.
    """
    if not keys:
        return []
    encoded = [k.encode() if isinstance(k, str) else bytes(k) for k in keys]
    pool = client.connection_pool
    conn = await _connection(pool)
    transport = _transport_of(conn)
    if transport is None:
        await pool.release(conn)  # before the fallback, which takes one from the pool
        fallback: list[Any] = await client.mget(encoded)
        if convert is not None:
            return [None if v is None else convert(memoryview(v)) for v in fallback]
        return fallback
    try:
        values = await _read(conn, transport, encoded, window, convert)
    finally:
        await _release(pool, conn)
    return values  # type: ignore[return-value]


async def _read(
    conn: Any,
    transport: asyncio.Transport,
    keys: list[bytes],
    window: int,
    convert: Callable[[memoryview], Any] | None,
) -> list[Any]:
    protocol = _Replies(keys, window, convert)
    original = protocol.original = transport.get_protocol()
    clean = False
    try:
        transport.set_protocol(protocol)
        if not transport.is_reading():
            transport.resume_reading()
        protocol.start(transport)
        idle = settings.socket_timeout()
        seen = 0  # bytes received by the end of the last idle period
        while True:
            try:
                values = await asyncio.wait_for(asyncio.shield(protocol.done), idle)
                break
            except TimeoutError:
                if protocol.progress == seen:
                    raise redis_errors.TimeoutError(
                        f"no bytes from the server for {idle}s while reading {len(keys)} values"
                    ) from None
                seen = protocol.progress
        clean = True
    finally:
        transport.set_protocol(original)
        if not clean:  # replies may still be on their way: this connection is spoilt
            protocol.done.cancel()
            transport.abort()
            await conn.disconnect()
    if protocol.errors:
        raise redis_errors.ResponseError(protocol.errors[0])
    return values


# Large values are written in pieces of this size, each once the one before has left:
# the transport then never buffers (and shifts, piece by piece) a whole value.
PIECE = 256 * 1024


async def set_value(
    client: aioredis.Redis,
    key: str | bytes,
    value: bytes | Sequence[bytes],
    *,
    ex: int | None,
) -> None:
    """``SET key value [EX ex]``, with the value written straight from its buffer.

    redis-py packs a command into one new bytes object (a copy of the value) and hands
    it to the transport at once, which copies what the socket does not take and shifts
    its buffer after every send: three or four copies of a 10 MB value.  Here the value
    is written piece by piece, each when the one before has been sent.  A value given
    as a sequence of parts is stored as their concatenation, without making it.
    """
    parts = [value] if isinstance(value, bytes | bytearray | memoryview) else list(value)
    pool = client.connection_pool
    conn = await _connection(pool)
    writer = getattr(conn, "_writer", None)
    if writer is None or not hasattr(writer, "drain"):
        await pool.release(conn)  # before the fallback, which takes one from the pool
        await client.set(key, b"".join(parts), ex=ex)
        return
    try:
        name = key.encode() if isinstance(key, str) else bytes(key)
        tail = b"\r\n"
        if ex is not None:
            tail += b"$2\r\nEX\r\n$%d\r\n%d\r\n" % (len(str(ex)), ex)
        count = 3 + (2 if ex is not None else 0)
        size = sum(len(part) for part in parts)
        head = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n" % (count, len(name), name, size)
        idle = settings.socket_timeout()
        clean = False
        try:
            writer.write(head)
            for part in parts:
                view = memoryview(part).cast("B")
                for start in range(0, len(view), PIECE):
                    writer.write(view[start : start + PIECE])
                    async with asyncio.timeout(idle):
                        await writer.drain()
            writer.write(tail)
            try:
                await conn.read_response()
            except redis_errors.ResponseError:  # the reply was read: the connection is fine
                clean = True
                raise
            clean = True
        finally:
            if not clean:  # a command cut short: this connection is spoilt
                writer.transport.abort()  # what it still buffers can never be sent
                await conn.disconnect()
    finally:
        await _release(pool, conn)
