"""Grid-wide logs: every process's log records in one capped stream on the grid's server.

A grid spreads one computation over many processes on many machines; when something
goes wrong, the story is in all their logs at once.  :class:`GridLogHandler` sends
each record, structured, to the stream ``Keys(namespace).logs`` (``XADD ... MAXLEN ~
LOG_STREAM_MAXLEN``), and :func:`read_logs` / :func:`follow_logs` read it back,
filtered by level and request, which is what ``pygirder logs -f`` shows.

Logging must never hurt the program that logs: records are queued (bounded) and sent
in batches by a background thread, so the caller never waits on the network and
never sees an exception.  When the server is unreachable or the queue is full,
records are dropped and counted (``handler.dropped``).

While a request runs, :data:`current_request_id` (or, failing that, the grid
worker's own request context) names it, so every record says which request it came
from.

Stream entry fields (all strings): ``time`` (epoch seconds), ``level``, ``levelno``,
``process``, ``host``, ``pid``, ``request`` (empty outside requests), ``logger``,
``message`` and, when the record carries an exception, ``exc``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis

from ..store.keys import LOG_STREAM_MAXLEN, Keys

__all__ = [
    "GridLogHandler",
    "LogEntry",
    "current_request_id",
    "follow_logs",
    "install_grid_logging",
    "parse_level",
    "read_logs",
]

# Set by the grid worker around each request it runs (and inherited by the tasks and
# threads it starts with a copied context), read by GridLogHandler.emit.
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pygirder_current_request_id", default=None
)

# Socket time-outs of the handler's own connection: a dead server costs the sender
# thread at most this long per attempt, never the caller.
_CONNECT_TIMEOUT_S = 1.0
_SOCKET_TIMEOUT_S = 2.0


def parse_level(level: str | int) -> int:
    """``"warning"``, ``"WARNING"``, ``"30"`` or ``30`` -> 30; ValueError otherwise."""
    if isinstance(level, int):
        return level
    text = str(level).strip()
    if text.isdigit():
        return int(text)
    value = logging.getLevelName(text.upper())
    if not isinstance(value, int):
        raise ValueError(
            f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR, CRITICAL or a number"
        )
    return value


def _request_id() -> str:
    """The request being run: ``current_request_id``, else the grid worker's context.

    The worker keeps its own ``RequestContext`` contextvar; reading it here (only if
    that module is already loaded) means records carry the request id even where
    only that one was set, without this module importing the grid.
    """
    rid = current_request_id.get()
    if rid:
        return rid
    grid_context = sys.modules.get("pygirder.grid.context")
    if grid_context is not None:
        try:
            ctx = grid_context.current_request.get()
            return str(ctx.request_id) if ctx is not None else ""
        except (AttributeError, LookupError):
            return ""
    return ""


def _default_host() -> str:
    return socket.gethostname()


class GridLogHandler(logging.Handler):
    """A logging handler that ships records to the grid's capped log stream.

    ``url_or_client`` is a ``redis://`` URL (the handler opens its own connection with
    short time-outs and no retries) or a sync ``redis.Redis`` client (used from the
    background thread; redis-py clients are thread-safe).  ``process_id`` defaults to
    ``<host>:<pid>``.  ``max_queue`` bounds memory when the server is slow or down.
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        namespace: str = "default",
        *,
        process_id: str | None = None,
        host: str | None = None,
        level: int | str = logging.NOTSET,
        maxlen: int = LOG_STREAM_MAXLEN,
        max_queue: int = 10_000,
        batch_size: int = 500,
        flush_interval: float = 0.1,
    ) -> None:
        super().__init__(parse_level(level))
        self.namespace = namespace
        self.stream = Keys(namespace).logs
        self.host = host or _default_host()
        self._fixed_process_id = process_id
        self.maxlen = maxlen
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.sent = 0
        self.dropped = 0
        self._url = url_or_client if isinstance(url_or_client, str) else None
        self._given_client = None if isinstance(url_or_client, str) else url_or_client
        self._exc_formatter = logging.Formatter()
        self._start()

    # -- life cycle ---------------------------------------------------------------
    def _start(self) -> None:
        """(Re)create the per-process state: queue, client, sender thread."""
        self.pid = os.getpid()
        self.process_id = self._fixed_process_id or f"{self.host}:{self.pid}"
        self._queue: queue.SimpleQueue[dict[str, str]] = queue.SimpleQueue()
        self._queued = 0  # records in the queue or in the batch being sent
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._client = self._given_client or redis.Redis.from_url(
            self._url,  # type: ignore[arg-type]
            socket_connect_timeout=_CONNECT_TIMEOUT_S,
            socket_timeout=_SOCKET_TIMEOUT_S,
            retry=None,
        )
        self._thread = threading.Thread(
            target=self._sender, name=f"pygirder-logs-{self.namespace}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Send what is queued (bounded wait), stop the sender, release the connection.

        ``logging.shutdown()`` calls this at interpreter exit, so records logged just
        before a process ends still reach the stream when the server is up.
        """
        try:
            if os.getpid() == self.pid and self._thread.is_alive():
                self.flush(timeout=_SOCKET_TIMEOUT_S)
                self._stop.set()
                with self._cond:
                    self._cond.notify_all()
                self._thread.join(timeout=_SOCKET_TIMEOUT_S)
            if self._given_client is None:
                self._client.close()
        except Exception:
            pass
        finally:
            super().close()

    def flush(self, timeout: float = 3.0) -> bool:  # type: ignore[override]
        """Wait until every queued record was sent or dropped; False on time-out."""
        if os.getpid() != self.pid or not self._thread.is_alive():
            return self._queued == 0
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()  # wake the sender now instead of at its next tick
            while self._queued > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- the caller's side: never blocks on the network, never raises -----------------
    def emit(self, record: logging.LogRecord) -> None:
        try:
            if os.getpid() != self.pid:  # forked: the sender thread did not come along
                self._start()
            if threading.get_ident() == self._thread.ident:
                return  # a record about sending records (redis-py): would feed back
            fields = self._fields(record)  # here: the request id lives in this context
            with self._cond:
                if self._queued >= self.max_queue:
                    self.dropped += 1
                    return
                self._queued += 1
            self._queue.put(fields)
        except Exception:
            self.dropped += 1

    def _fields(self, record: logging.LogRecord) -> dict[str, str]:
        fields = {
            "time": f"{record.created:.6f}",
            "level": record.levelname,
            "levelno": str(record.levelno),
            "process": self.process_id,
            "host": self.host,
            "pid": str(self.pid),
            "request": _request_id(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            fields["exc"] = self._exc_formatter.formatException(record.exc_info)
        elif record.exc_text:
            fields["exc"] = record.exc_text
        return fields

    # -- the sender thread ------------------------------------------------------------
    def _sender(self) -> None:
        backoff = 0.0
        while True:
            with self._cond:
                if self._queued == 0 and not self._stop.is_set():
                    self._cond.wait(self.flush_interval)
            batch = self._take_batch()
            if not batch:
                if self._stop.is_set():
                    return
                continue
            if backoff and time.monotonic() < backoff:
                self._done(batch, sent=False)  # server known down: drop, do not wait
                continue
            try:
                pipe = self._client.pipeline(transaction=False)
                for fields in batch:
                    pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
                pipe.execute()
            except Exception:
                backoff = time.monotonic() + 1.0
                self._done(batch, sent=False)
            else:
                backoff = 0.0
                self._done(batch, sent=True)

    def _take_batch(self) -> list[dict[str, str]]:
        batch: list[dict[str, str]] = []
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _done(self, batch: list[dict[str, str]], *, sent: bool) -> None:
        with self._cond:
            if sent:
                self.sent += len(batch)
            else:
                self.dropped += len(batch)
            self._queued -= len(batch)
            self._cond.notify_all()


def install_grid_logging(
    url: str | redis.Redis,
    namespace: str = "default",
    level: int | str = logging.INFO,
    process_id: str | None = None,
    *,
    logger: logging.Logger | str | None = None,
) -> GridLogHandler:
    """Send this process's log records at ``level`` and above to the grid's log stream.

    Attaches a :class:`GridLogHandler` to the root logger (or ``logger``), replacing
    one this function installed earlier for the same namespace, and lowers that
    logger's level to ``level`` if it was higher (else the records never reach the
    handler).  Returns the handler; ``handler.close()`` uninstalls nothing, use
    ``logger.removeHandler(handler)`` for that.
    """
    target = logger if isinstance(logger, logging.Logger) else logging.getLogger(logger)
    lvl = parse_level(level)
    for old in list(target.handlers):
        if isinstance(old, GridLogHandler) and old.namespace == namespace:
            target.removeHandler(old)
            old.close()
    handler = GridLogHandler(url, namespace, process_id=process_id, level=lvl)
    target.addHandler(handler)
    if target.level == logging.NOTSET or target.level > lvl:
        target.setLevel(lvl)
    return handler


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogEntry:
    """One record read back from the log stream; ``id`` is its stream entry id."""

    id: str
    time: float
    level: str
    levelno: int
    process: str
    host: str
    pid: int
    request: str
    logger: str
    message: str
    exc: str = ""

    @classmethod
    def from_stream(cls, entry_id: Any, fields: Mapping[Any, Any] | None) -> LogEntry:
        f = {_text(k): _text(v) for k, v in (fields or {}).items()}
        return cls(
            id=_text(entry_id),
            time=_float(f.get("time"), default=_id_ms(_text(entry_id)) / 1000),
            level=f.get("level", "INFO"),
            levelno=int(_float(f.get("levelno"), default=logging.INFO)),
            process=f.get("process", ""),
            host=f.get("host", ""),
            pid=int(_float(f.get("pid"), default=0)),
            request=f.get("request", ""),
            logger=f.get("logger", ""),
            message=f.get("message", ""),
            exc=f.get("exc", ""),
        )

    def matches(self, levelno: int | None, request: str | None) -> bool:
        """``levelno``: minimum level; ``request``: request id or a prefix of it."""
        if levelno is not None and self.levelno < levelno:
            return False
        return not request or self.request.startswith(request)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _float(value: str | None, *, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default


def _id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _since_bound(since: str | float | datetime | None) -> str:
    """Lower bound for XRANGE-style reads: an entry id is exclusive, a time inclusive."""
    if since is None:
        return "-"
    if isinstance(since, datetime):
        since = since.timestamp()
    if isinstance(since, int | float):
        return f"{int(since * 1000)}-0"
    return f"({since}"


def read_logs(
    client: redis.Redis,
    namespace: str = "default",
    *,
    since: str | float | datetime | None = None,
    level: int | str | None = None,
    request: str | None = None,
    count: int = 100,
) -> list[LogEntry]:
    """The latest ``count`` records that match, oldest first.

    ``since`` is a stream entry id (records after it), or a time (epoch seconds or a
    datetime; records at or after it).  ``level`` is a minimum level; ``request`` a
    request id or a prefix of one (the short ids ``pygirder logs`` prints).
    """
    key = Keys(namespace).logs
    levelno = parse_level(level) if level is not None else None
    low = _since_bound(since)
    high = "+"
    found: list[LogEntry] = []
    chunk = max(count, 200) if (levelno is not None or request) else count
    while len(found) < count:
        entries = client.xrevrange(key, max=high, min=low, count=chunk)
        if not entries:
            break
        for entry_id, fields in entries:
            entry = LogEntry.from_stream(entry_id, fields)
            if entry.matches(levelno, request):
                found.append(entry)
                if len(found) >= count:
                    break
        if len(entries) < chunk:
            break
        high = f"({_text(entries[-1][0])}"
    found.reverse()
    return found


def last_entry_id(client: redis.Redis, namespace: str = "default") -> str:
    """Id of the newest record in the stream, ``0-0`` when it is empty or missing."""
    newest = client.xrevrange(Keys(namespace).logs, count=1)
    return _text(newest[0][0]) if newest else "0-0"


def follow_logs(
    client: redis.Redis,
    namespace: str = "default",
    *,
    since: str | None = None,
    level: int | str | None = None,
    request: str | None = None,
    block_ms: int = 1000,
    stop: threading.Event | None = None,
) -> Iterator[LogEntry]:
    """Yield records as they arrive (XREAD BLOCK), forever or until ``stop`` is set.

    Starts after entry id ``since``, or, by default, after the newest record at the
    time of this call (not of the first ``next()``), so nothing logged in between is
    missed.  ``block_ms`` bounds how long ``stop`` can go unnoticed.
    """
    key = Keys(namespace).logs
    levelno = parse_level(level) if level is not None else None
    start = since if since is not None else last_entry_id(client, namespace)
    return _follow(client, key, start, levelno, request, block_ms, stop)


def _follow(
    client: redis.Redis,
    key: str,
    last: str,
    levelno: int | None,
    request: str | None,
    block_ms: int,
    stop: threading.Event | None,
) -> Iterator[LogEntry]:
    while stop is None or not stop.is_set():
        reply: Any = client.xread({key: last}, count=1000, block=block_ms)
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                last = _text(entry_id)
                entry = LogEntry.from_stream(entry_id, fields)
                if entry.matches(levelno, request):
                    yield entry


def newer_id(a: str, b: str) -> str:
    """The later of two stream entry ids."""
    return a if _id_tuple(a) >= _id_tuple(b) else b
