"""The execution limit: a watchdog thread fails a call over its ``max_runtime``.

It runs in a thread of its own, so it sees an async call that blocks the event loop
as well as a sync one spinning in its thread.  Python cannot stop a running thread,
so the process goes: the call is failed (not retried: a rerun would spin again),
the rest of this process's work is handed back, and the process is replaced (see
:func:`reexec`).  The same thread aborts a call running inline on the loop's thread
that goes on too long, so it runs again on a thread (``inline``), and keeps this
process's heartbeat alive while such a run is blocked in C, where it cannot be aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import CallLink, RemoteError
from ...store import scripts
from ..connection import connect_sync, scrub
from ..protocol import encode_error
from ..runtime import Runtime
from .inline import Inline

if TYPE_CHECKING:
    import redis

log = logging.getLogger("pygirder.worker")


@dataclass(frozen=True)
class _Watch:
    """The call holding the baton, for the watchdog: when it started holding, how long
    it held it before, and its limit."""

    request_id: str
    function: str
    since: float  # time.monotonic() when it took the baton
    used: float  # seconds it held the baton before
    limit: float
    started: float  # time.time() of the start of its run


class Watchdog:
    """Accounts the time each call holds the baton, and enforces its limit."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        worker_id: str,
        pool: str,
        error_ttl: int,
        stopping: asyncio.Event,
        restart: Callable[[], None],
        inline: Inline | None = None,
    ) -> None:
        self.runtime = runtime
        self.worker_id = worker_id
        self.pool = pool
        self.error_ttl = error_ttl
        self.stopping = stopping
        self.restart = restart
        self.inline = inline  # calls run on the loop's thread, aborted when too long
        self.holder: str | None = None  # the request holding the baton
        self.holder_fn: str | None = None
        self._limits: dict[str, float] = {}  # running request -> its limit (if any)
        self._used: dict[str, float] = {}  # running request -> seconds it held the baton
        self._watch: _Watch | None = None  # read by the watchdog thread
        self.loop: asyncio.AbstractEventLoop | None = None
        self._client: redis.Redis | None = None  # this thread's, for heartbeats (lazily)
        self._beaten_at: float | None = None  # a heartbeat sent for a run blocked in C

    def limit(self, request_id: str, seconds: float) -> None:
        self._limits[request_id] = seconds

    def forget(self, request_id: str) -> None:
        self._limits.pop(request_id, None)
        self._used.pop(request_id, None)

    def hold(self, request_id: str | None, function: str | None = None) -> None:
        """Remember which request holds the baton (shown by `pygirder status`), and
        account the time each request holds it.  Twice per call: without limits it
        only names the holder."""
        self.holder, self.holder_fn = request_id, function
        watch = self._watch
        if watch is None and not self._limits:
            return
        now = time.monotonic()
        if watch is not None:
            self._used[watch.request_id] = watch.used + (now - watch.since)
        limit = self._limits.get(request_id) if request_id is not None else None
        if request_id is None or not limit:
            self._watch = None
        else:
            self._watch = _Watch(request_id, function or "?", now, self._used.get(request_id, 0.0),
                                 limit, time.time())  # fmt: skip

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        threading.Thread(target=self._run, name="pygirder-watchdog", daemon=True).start()

    def _run(self) -> None:
        while True:
            watch = self._watch
            period = 0.1 if watch is None else min(0.1, watch.limit / 10)
            time.sleep(max(0.01, period))
            watch = self._watch
            if self.loop is not None and self.loop.is_closed():
                return
            if self.inline is not None and self.inline.abort_if_over():
                self._beat()
            else:
                self._beaten_at = None
            if watch is None or self.loop is None:
                continue
            ran = watch.used + (time.monotonic() - watch.since)
            if ran > watch.limit and self._watch is watch:
                self._over_limit(watch, ran)
                return

    def _beat(self) -> None:
        """Refresh this process's heartbeat as ``Runtime.beat`` does, every heartbeat
        period, while the event loop is held by a run inline blocked in C."""
        liveness = self.runtime.liveness
        now = time.monotonic()
        if self._beaten_at is not None and now - self._beaten_at < liveness.heartbeat_every:
            return
        self._beaten_at = now
        try:
            if self._client is None:
                # a beat later than the TTL is of no use: retry no longer than that
                self._client = connect_sync(self.runtime.url,
                                            reconnect_timeout=liveness.heartbeat_ttl)  # fmt: skip
            self._client.set(self.runtime.keys.heartbeat(self.runtime.process_id), b"1",
                             px=int(liveness.heartbeat_ttl * 1000))  # fmt: skip
        except Exception as exc:  # try again at the next period
            log.warning("heartbeat failed: %s", scrub(str(exc), self.runtime.url))

    def _over_limit(self, watch: _Watch, ran: float) -> None:
        import redis as sync_redis

        keys = self.runtime.keys
        log.error("%s [%s] ran %.1fs, over its max_runtime of %gs: failing it and restarting "
                  "worker %s", watch.function, watch.request_id, ran, watch.limit,
                  self.worker_id)  # fmt: skip
        error = RemoteError(
            "pygirder.MaxRuntimeExceeded",
            f"{watch.function} ran for more than its max_runtime of {watch.limit:g} s and was "
            f"stopped (its worker process {self.worker_id} was restarted). Raise "
            "@pygirder.fn(max_runtime=...) (or the worker's --max-runtime / "
            "PYGIRDER_MAX_RUNTIME) if it needs longer, or look for an endless loop",
            "",
            [CallLink(watch.request_id, watch.function)],
        )
        client = sync_redis.Redis.from_url(self.runtime.url, socket_timeout=10,
                                           socket_connect_timeout=5)  # fmt: skip
        try:
            conn = scripts.SyncRunner(client)
            summary = f"MaxRuntimeExceeded: over {watch.limit:g} s"
            failed = scripts.Completion(watch.request_id, encode_error(error), self.error_ttl,
                                        watch.started, summary)  # fmt: skip
            scripts.complete(conn, keys, [failed], worker=self.worker_id)
            # the rest of this process's work (its stack, parked and in-flight calls)
            while scripts.requeue(conn, keys, worker=self.worker_id)[1]:
                pass  # a bounded page per call, until nothing is left
            client.hdel(keys.idle(self.pool), self.worker_id)
        except Exception as exc:  # the reaper requeues whatever we could not hand back
            log.error("could not fail %s or hand back work: %s", watch.request_id, exc)
        finally:
            client.close()
        # The registration stays: anything taken between the hand-back and the restart
        # is requeued by the reaper once this id's heartbeat lapses.
        if self.stopping.is_set():  # told to stop: it was only finishing that call
            _flush_logs()
            os._exit(0)
        self.restart()


def _flush_logs() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def reexec() -> None:
    """Replace this process by a fresh copy of itself (same pid, same command line), so
    `pygirder worker` comes back with or without a supervisor."""
    _flush_logs()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    finally:
        os._exit(70)  # exec failed: exit and let a supervisor start us again
