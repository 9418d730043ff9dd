"""Connections to the grid's server: clients that ride out a restart, and URLs
that never show their password.

Every process opens its clients here: the first contact fails fast with an error a
person can act on; afterwards lost connections are retried with backoff for the
reconnect window, and a reply slower than the socket time-out fails its command.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry as SyncRetry

from .. import settings
from ..errors import GridConnectionError


async def connect_redis(
    url: str,
    *,
    max_connections: int | None = None,
    reconnect_timeout: float | None = None,
    block: float = 0.0,
) -> aioredis.Redis:
    """Open a client and prove the server answers, with errors a person can act on.

    The first contact fails fast; afterwards the client retries lost connections with
    backoff for ``reconnect_timeout`` seconds, so a server restart is ridden out.  Only
    connection errors are retried: a reply that takes longer than the socket time-out
    (``block`` seconds more for a client that issues blocking reads) fails that command
    instead of sending it again, because the server may have run it already.
    """
    timeout = (
        settings.liveness().reconnect_timeout if reconnect_timeout is None else (reconnect_timeout)
    )
    probe = aioredis.Redis.from_url(url, decode_responses=False, max_connections=1)
    try:
        await probe.ping()
    except redis_errors.AuthenticationError as exc:
        if urlsplit(url).password is None:
            raise GridConnectionError(
                f"the server at {redact(url)} requires a password: "
                "put it in the URL (redis://:password@host:port/db)"
            ) from None
        raise GridConnectionError(
            f"the server at {redact(url)} refused the credentials ({exc}); "
            "check the user and password in the URL (redis://user:password@host:port/db)"
        ) from None
    except redis_errors.ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise GridConnectionError(
                f"the server at {redact(url)} requires a password: "
                "put it in the URL (redis://:password@host:port/db)"
            ) from None
        raise
    except (redis_errors.ConnectionError, OSError) as exc:
        raise GridConnectionError(
            f"cannot reach the Redis/Valkey server at {redact(url)}: {exc}. "
            "Is it running? Start one with `pygirder server`, or use pygirder.connect() "
            "without a URL for a private one"
        ) from None
    finally:
        await probe.aclose()
    options = _options(Retry, timeout, block)
    if max_connections is None:
        client = aioredis.Redis.from_url(url, **options)
        _pack_in_c(client.connection_pool)
        return client
    # A bounded pool makes concurrent commands wait for a connection instead of
    # opening one more (each new one costs HELLO and CLIENT SETINFO on the server, and
    # a grid of a thousand workers holds every connection they ever opened).
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=None, **options
    )
    _pack_in_c(pool)
    return aioredis.Redis.from_pool(pool)


_SMALL = frozenset({str, bytes, int, float})
_FAST_CLASSES: dict[type, type] = {}
_CUTOFF = 6000  # redis-py's buffer cut-off: larger arguments travel on their own


def _pack_in_c(pool: aioredis.ConnectionPool) -> None:
    """Let the pool's connections pack commands with hiredis where it is installed.

    redis-py's asyncio connection packs a command in a Python loop over its
    arguments, and a script over a batch of calls has thousands (five keys per call):
    that loop was the largest single cost of a client submitting a large map.
    ``hiredis.pack_command`` writes the same bytes in C (the synchronous client uses
    it already).  Large values and memoryviews are sent beside the packed runs of
    small arguments, uncopied, as redis-py sends them; a command with any other kind
    of argument keeps redis-py's packing, and its errors.
    """
    try:
        from hiredis import pack_command
    except ImportError:  # an optional speed-up of redis[hiredis]
        return
    base = pool.connection_class
    fast = _FAST_CLASSES.get(base)
    if fast is None:

        def run(small: list[Any]) -> bytes:
            packed: bytes = pack_command(tuple(small))
            return packed[packed.index(b"\r\n") + 2 :]  # without the array header

        def pack(self: Any, *args: Any) -> list[Any]:
            first = args[0]
            if type(first) is not str or " " in first:  # redis-py splits "CONFIG GET"
                return base.pack_command(self, *args)  # type: ignore[no-any-return]
            out: list[Any] = []
            small: list[Any] = []
            for arg in args:
                kind = type(arg)
                if kind in _SMALL and (kind is int or kind is float or len(arg) <= _CUTOFF):
                    small.append(arg)
                    continue
                if kind is str:
                    arg = arg.encode()
                elif kind is not bytes and kind is not memoryview:
                    return base.pack_command(self, *args)  # type: ignore[no-any-return]
                if small:
                    out.append(run(small))
                    small = []
                out += [b"$%d\r\n" % len(arg), arg, b"\r\n"]
            if not out:
                return [pack_command(args)]
            if small:
                out.append(run(small))
            out.insert(0, b"*%d\r\n" % len(args))
            return out

        fast = type(base.__name__, (base,), {"pack_command": pack, "__module__": __name__})
        _FAST_CLASSES[base] = fast
    pool.connection_class = fast


def connect_sync(url: str, *, reconnect_timeout: float | None = None) -> redis.Redis:
    """A synchronous client with the settings of ``connect_redis``, for a thread that
    must reach the server while the event loop is held (the watchdog's heartbeats).
    It connects at its first command; its errors are that command's."""
    if reconnect_timeout is None:
        reconnect_timeout = settings.liveness().reconnect_timeout
    options = _options(SyncRetry, reconnect_timeout, 0.0)
    return redis.Redis.from_url(url, **options)


def reconnect_policy(timeout: float) -> tuple[ExponentialBackoff, int]:
    """The backoff and the number of retries that ride out ``timeout`` seconds without
    a connection: capped at 0.5 s, about two tries a second for the whole window."""
    return ExponentialBackoff(cap=0.5, base=0.02), max(1, int(timeout * 2))


def _options(retry_type: Any, timeout: float, block: float) -> dict[str, Any]:
    # Retry only lost connections: redis-py also retries time-outs by default.
    backoff, retries = reconnect_policy(timeout)
    retry = retry_type(backoff, retries=retries, supported_errors=(redis_errors.ConnectionError,))
    read_timeout = settings.socket_timeout() + block
    return dict(
        decode_responses=False,
        health_check_interval=30,
        socket_timeout=read_timeout,
        socket_connect_timeout=min(read_timeout, 10.0),
        socket_keepalive=True,
        retry=retry,
        retry_on_error=[redis_errors.ConnectionError],
    )


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}"
    else:
        netloc = f":***@{netloc}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def scrub(text: str, url: str) -> str:
    """``text`` (an error message, a log line) with the URL's password masked."""
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def unreachable(url: str, exc: BaseException) -> str:
    """The command-line error for a server that cannot be reached, without its password."""
    return f"error: cannot reach the grid's server at {redact(url)}: {scrub(str(exc), url)}"
