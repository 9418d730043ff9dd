"""Grid timings and limits, with the environment variables that override them, in one place.

Defaults suit a production grid; tests and chaos drills shorten the liveness timings
through the environment (``PYGIRDER_HEARTBEAT_TTL=1.5``) so worker processes started
anywhere pick them up without extra plumbing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


def _env_float(name: str, default: float, *, minimum: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= minimum:
        raise ConfigError(f"{name}={raw!r}: expected a number >= {minimum}")
    return value


@dataclass(frozen=True)
class Liveness:
    """How fast the grid notices a dead process and what it does about it."""

    heartbeat_ttl: float  # a process whose heartbeat is older than this is dead
    max_attempts: int  # a request that killed this many workers is failed ("poison")
    reconnect_timeout: float  # how long to keep retrying a lost server before failing

    @property
    def heartbeat_every(self) -> float:
        return self.heartbeat_ttl / 4

    @property
    def reap_every(self) -> float:
        return max(0.2, self.heartbeat_ttl / 4)


def liveness() -> Liveness:
    return Liveness(
        heartbeat_ttl=_env_float("PYGIRDER_HEARTBEAT_TTL", 10.0, minimum=0.5),
        max_attempts=int(_env_float("PYGIRDER_MAX_ATTEMPTS", 3, minimum=1)),
        reconnect_timeout=_env_float("PYGIRDER_RECONNECT_TIMEOUT", 120.0, minimum=0.0),
    )


def socket_timeout() -> float:
    """Seconds a command may wait for its reply (``PYGIRDER_SOCKET_TIMEOUT``).

    A reply that does not come in time is an error for that command only: it is never
    sent again (a script that ran but whose reply was slow must not run twice).  At
    least 2 s, so a worker's 1 s blocking take always gets its reply.
    """
    return _env_float("PYGIRDER_SOCKET_TIMEOUT", 60.0, minimum=2.0)


def inbox_block() -> float:
    """Seconds one blocking read of a process's inbox waits on the server
    (``PYGIRDER_INBOX_BLOCK``); the read is then simply repeated, so a wait of any
    length is a sequence of reads that each end well before the socket time-out."""
    return _env_float("PYGIRDER_INBOX_BLOCK", 5.0, minimum=0.1)


def cache_bytes() -> int:
    """Bytes of recent results each process keeps in memory (``PYGIRDER_CACHE_BYTES``,
    default 64 MiB; 0: none).  A result larger than a quarter of it is not kept."""
    return int(_env_float("PYGIRDER_CACHE_BYTES", 64 << 20, minimum=0))


def max_result_bytes() -> int:
    """Largest encoded result a worker stores (``PYGIRDER_MAX_RESULT_BYTES``)."""
    from .codec import DEFAULT_LIMITS

    return int(_env_float("PYGIRDER_MAX_RESULT_BYTES", DEFAULT_LIMITS["max_result_bytes"],
                          minimum=1))  # fmt: skip


COMPRESSION_MODES = ("auto", "lz4", "off")


def compression() -> str:
    """How large values are compressed on their way to the server
    (``PYGIRDER_COMPRESS``): ``auto`` (the default) compresses with lz4 when the server
    is not on this machine, ``lz4`` always, ``off`` never.  On loopback the copy
    through the server costs less than compressing."""
    raw = os.environ.get("PYGIRDER_COMPRESS", "auto").strip().lower() or "auto"
    if raw not in COMPRESSION_MODES:
        raise ConfigError(
            f"PYGIRDER_COMPRESS={raw!r}: expected one of {', '.join(COMPRESSION_MODES)}"
        )
    return raw


def pickle_codec() -> Any:
    """The opt-in pickle codec for results, when ``PYGIRDER_SECRET`` is set (else None).

    Every member of the grid must share the secret: results msgpack cannot carry are
    then pickled and HMAC-signed, and a result whose signature does not verify is
    refused before it is unpickled.  Request ids still come from msgpack, so arguments
    must stay plain data.
    """
    secret = os.environ.get("PYGIRDER_SECRET")
    if not secret:
        return None
    from .codec import PickleCodec

    return PickleCodec(secret)


def max_runtime() -> float:
    """Worker-wide default limit on the time one call computes (``PYGIRDER_MAX_RUNTIME``).

    Seconds the call holds its worker's baton, summed over its run (waiting on sub-calls
    does not count); 0 means no limit.  ``@pygirder.fn(max_runtime=...)`` overrides it.
    """
    return _env_float("PYGIRDER_MAX_RUNTIME", 0.0, minimum=0.0)


def idle_threads() -> int:
    """How many idle threads a worker keeps for sync calls (``PYGIRDER_IDLE_THREADS``).

    Not a limit on threads: a sync call waiting on sub-calls keeps its thread, so a
    worker starts one more whenever none is free (a cap would stop the worker once
    waiting calls held every thread).  Idle threads beyond this number exit at once,
    the others after ``PYGIRDER_THREAD_IDLE_S`` seconds without work.
    """
    return int(_env_float("PYGIRDER_IDLE_THREADS", 16, minimum=0))


def thread_idle_s() -> float:
    return _env_float("PYGIRDER_THREAD_IDLE_S", 60.0, minimum=0.01)


def inline_s() -> float:
    """A sync function whose last runs each took less than this runs on the worker's
    event loop thread, without a thread hop (``PYGIRDER_INLINE_S``; 0 turns this off).

    Above the interpreter's 5 ms switch interval, so a run that merely waited for the
    GIL (the durable store's writer thread) does not count as long."""
    return _env_float("PYGIRDER_INLINE_S", 0.02, minimum=0.0)


def store_retries() -> int:
    """Attempts to store a batch of results before it is split (``PYGIRDER_STORE_RETRIES``)."""
    return int(_env_float("PYGIRDER_STORE_RETRIES", 4, minimum=1))


def store_max_bytes() -> int:
    """Size cap of a local result store (``PYGIRDER_STORE_MAX_BYTES``: bytes or a size
    such as ``5gb``; 0: no cap).  Past it the least recently used results are pruned."""
    from .results.local import DEFAULT_MAX_BYTES

    raw = os.environ.get("PYGIRDER_STORE_MAX_BYTES", "")
    if not raw:
        return DEFAULT_MAX_BYTES
    from .server import parse_memory

    try:
        return parse_memory(raw)
    except ConfigError as exc:
        raise ConfigError(f"PYGIRDER_STORE_MAX_BYTES: {exc}") from None


def store_spec() -> str:
    """Where results are kept durably (``PYGIRDER_STORE``: a folder, ``s3://bucket/prefix``
    or ``off``); empty means the default, a folder in the user's cache folder."""
    return os.environ.get("PYGIRDER_STORE", "")


def hot_result_ttl() -> int:
    """Seconds Valkey keeps a result once the durable store has it (``PYGIRDER_HOT_TTL``;
    0: for ever).  Later calls are answered from the store, so Valkey holds the recent
    results only and its memory stays bounded however many results a grid computes."""
    return int(_env_float("PYGIRDER_HOT_TTL", 3600, minimum=0))


def store_flush_s() -> float:
    """Seconds a stopping worker waits for its last results to reach the durable store
    (``PYGIRDER_STORE_FLUSH_S``); what is left after that is only in Valkey."""
    return _env_float("PYGIRDER_STORE_FLUSH_S", 20.0, minimum=0.0)
